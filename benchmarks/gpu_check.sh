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

echo "[gpu_check] building the extension (MAX_JOBS=${MAX_JOBS:-$(nproc)})"
# Into a folder of its own (no write access to the system's site-packages needed).
SITE="${GPU_CHECK_SITE:-/tmp/diffeqlayers_gpu_site}"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PYTHON" -m pip install -q --no-build-isolation --no-deps \
  --no-cache-dir --upgrade --target "$SITE" . || { echo "[gpu_check] build FAILED" >&2; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
echo "[gpu_check] build took $((SECONDS - start)) s"

rc=0
"$PYTHON" -m pytest tests/python/test_cuda.py tests/python/test_ops.py -q -p no:cacheprovider \
  -rs || rc=$?
echo "[gpu_check] tests done at $((SECONDS - start)) s (pytest exit code $rc)"

"$PYTHON" benchmarks/bench_gpu.py --repeats "$REPEATS" --out "$DEST/gpu.md" || rc=$?
echo "[gpu_check] bench_gpu done at $((SECONDS - start)) s"

# torchode's Van der Pol benchmark in its own setting, the GPU: every peer that is installed
# (torchode eager and compiled, torchdiffeq, diffrax on JAX's GPU backend).
"$PYTHON" benchmarks/bench_vdp.py --device cuda --compile --repeats "$REPEATS" \
  --out "$DEST/vdp_gpu.md" || rc=$?
echo "[gpu_check] finished in $((SECONDS - start)) s"
exit "$rc"
