#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then trains the Lotka-Volterra neural ODE example: prints the loss
# and writes examples/out/lotka_volterra.png.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
"$PYTHON" examples/lotka_volterra_neural_ode.py "$@"
