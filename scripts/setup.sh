#!/usr/bin/env bash
# Idempotent set-up of a Debian 12 machine (as root) for building and testing diffeqlayers:
# system tools, Python packages, then this package itself. Each step is skipped when it is
# already done, so re-running costs seconds (the extension rebuild is a ninja no-op or ccache hits).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
log() { echo "[setup] $*"; }

# --- system packages -------------------------------------------------------------------------
APT_PACKAGES=(cmake g++ ninja-build libgtest-dev ccache)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  SUDO=""
  [[ $(id -u) -eq 0 ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- Python packages -------------------------------------------------------------------------
# A Debian system Python refuses pip installs (PEP 668) unless told otherwise.
if [[ -n "$("$PYTHON" -c 'import sys, sysconfig, os; p = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"); print(p if os.path.exists(p) else "")')" ]]; then
  export PIP_BREAK_SYSTEM_PACKAGES=1
fi
PIP=("$PYTHON" -m pip install --disable-pip-version-check --root-user-action=ignore -q)

# Never a bare `torch` (and never upgrade an installed one): a pinned version, only when missing.
if ! "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
  log "pip install torch==2.13.0"
  "${PIP[@]}" torch==2.13.0
fi

# torch is installed by now, so none of these pulls another one in (scikit-learn does not depend
# on torch; it is for examples/ode_layer_digits.py and its test).
need_pip=0
"$PYTHON" - <<'PY' || need_pip=1
import importlib.metadata as md
import sys
want = {"numpy": None, "pybind11": None, "ninja": None, "pytest": None, "matplotlib": None,
        "scipy": None, "scikit-learn": None, "torchdiffeq": "0.2.5", "setuptools": None,
        "wheel": None}
for name, version in want.items():
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if version is not None and have != version:
        sys.exit(1)
PY
if ((need_pip)); then
  log "pip install numpy pybind11 ninja pytest matplotlib scipy scikit-learn torchdiffeq==0.2.5"
  "${PIP[@]}" numpy pybind11 ninja pytest matplotlib scipy scikit-learn torchdiffeq==0.2.5 \
    setuptools wheel
fi

# --- this package ----------------------------------------------------------------------------
# Built in-tree (build/python keeps ninja's state) through ccache; see setup.py.
log "pip install --no-build-isolation . (diffeqlayers._C)"
start=$SECONDS
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
"${PIP[@]}" --no-build-isolation --no-deps .
log "diffeqlayers installed in $((SECONDS - start)) s"
