#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA GPU and a CUDA build of PyTorch already installed
# (nothing is downloaded): builds the extension against that PyTorch, runs the CUDA tests and the
# opcheck tests of the registered operators, then the GPU benchmarks (benchmarks/bench_gpu.py, and
# benchmarks/bench_vdp.py --device cuda).
# Meant to finish in under 8 minutes (the build takes most of it; MAX_JOBS defaults to nproc).
# Writes its log and the benchmark's table under $OUT when set (the device tool's output folder),
# else under benchmarks/results/ (gpu.md, vdp_gpu.md) and build/gpu_check.log.
#
#     bash benchmarks/gpu_check.sh [--repeats N]
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
REPEATS=10
if [[ "${1:-}" == "--repeats" && -n "${2:-}" ]]; then REPEATS="$2"; fi
DEST="${OUT:-$ROOT/benchmarks/results}"
mkdir -p "$DEST" build
LOG="${OUT:+$OUT/gpu_check.log}"
LOG="${LOG:-$ROOT/build/gpu_check.log}"
exec > >(tee "$LOG") 2>&1
start=$SECONDS

if ! "$PYTHON" - <<'EOF'; then
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name(0)}")
EOF
  exit 1
fi

# The compiler: GPU_CHECK_CXX, else the system's /usr/bin/g++, else CXX. Seen on 2026-12-04 on a
# lent H200 machine: its environment set CXX=/opt/gcc/bin/g++ (a wrapper around the system's GCC
# 13), and the extension built with it segfaulted formatting an integer into a std::ostringstream
# (MLPSpec::repr: libstdc++'s ostream code ran from inside the extension, not from the process's
# libstdc++); the same sources built with /usr/bin/g++ passed.
if [[ -z "${GPU_CHECK_CXX:-}" && -x /usr/bin/g++ ]]; then GPU_CHECK_CXX=/usr/bin/g++; fi
export CXX="${GPU_CHECK_CXX:-${CXX:-g++}}"
echo "[gpu_check] building the extension with $CXX (MAX_JOBS=${MAX_JOBS:-$(nproc)})"
# Into a folder of its own (no write access to the system's site-packages needed).
SITE="${GPU_CHECK_SITE:-/tmp/diffeqlayers_gpu_site}"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PYTHON" -m pip install -q --no-build-isolation --no-deps \
  --no-cache-dir --upgrade --target "$SITE" . || { echo "[gpu_check] build FAILED" >&2; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
echo "[gpu_check] build took $((SECONDS - start)) s"
if ! "$PYTHON" -c 'import diffeqlayers as dl; repr(dl.MLP([2, 3, 2]))'; then
  echo "[gpu_check] the built extension fails a smoke test (built with $CXX): try GPU_CHECK_CXX" >&2
  exit 1
fi

# Peers missing from the machine (torchode and its needs torchtyping and typeguard, on the lent
# H200 image) may come along as wheels in .whl/ (the device tool's README says how to fetch them).
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE-peers" .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$SITE-peers"
fi

rc=0
"$PYTHON" -m pytest tests/python/test_cuda.py tests/python/test_ops.py -q -p no:cacheprovider \
  -rs --tb=short || rc=$?
echo "[gpu_check] tests done at $((SECONDS - start)) s (pytest exit code $rc)"

"$PYTHON" benchmarks/bench_gpu.py --repeats "$REPEATS" --out "$DEST/gpu.md" || rc=$?
echo "[gpu_check] bench_gpu done at $((SECONDS - start)) s"

# torchode's Van der Pol benchmark in its own setting, the GPU: every peer that is installed
# (torchode eager and compiled, torchdiffeq, diffrax on JAX's GPU backend).
"$PYTHON" benchmarks/bench_vdp.py --device cuda --compile --repeats "$REPEATS" \
  --out "$DEST/vdp_gpu.md" || rc=$?
echo "[gpu_check] finished in $((SECONDS - start)) s"
exit "$rc"
