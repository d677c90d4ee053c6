#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs every test: the C++ suite, examples and the find_package
# consumer through ctest, and the Python suite through pytest. Both run even if the first fails;
# the exit code is non-zero if either did.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh || { echo "[test] setup failed" >&2; exit 1; }

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
JOBS="${JOBS:-$(nproc)}"
BUILD_DIR="${BUILD_DIR:-build}"

cpp_rc=0
start=$SECONDS
echo "[test] configure + build ${BUILD_DIR}/ (Release, ninja, ccache)"
if cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
     -DDIFFEQLAYERS_PYTHON="$PYTHON" &&
   cmake --build "$BUILD_DIR" --parallel "$JOBS"; then
  echo "[test] C++ build took $((SECONDS - start)) s"
  (cd "$BUILD_DIR" && ctest --output-on-failure --parallel "$JOBS") || cpp_rc=$?
else
  cpp_rc=1
  echo "[test] C++ build FAILED" >&2
fi

py_rc=0
"$PYTHON" -m pytest tests/python -q || py_rc=$?

if ((cpp_rc != 0 || py_rc != 0)); then
  echo "[test] FAILED: ctest exit code ${cpp_rc}, pytest exit code ${py_rc}" >&2
  exit 1
fi
