#!/usr/bin/env bash
# The GPU smoke test, for any machine with a CUDA GPU and this project installed (`pip install -e ".[dev]"`; this
# script installs nothing). Two parts, a few minutes in all:
#   1. pytest -m gpu: the tests of tests/test_gpu.py (AMP + channels_last training on CUDA, the tiny pipeline through
#      fine-tuning on CUDA with the re-parameterization check under TF32, ONNX Runtime's CUDA and TensorRT providers
#      where ORT has them);
#   2. the quickstart recipe, every stage, with --set device=cuda, into a temporary run directory (kept with KEEP=DIR).
# Then a summary: the GPU and versions, one line per part, and the quickstart's report. Exit status 1 if a part failed
# or torch sees no CUDA device.
#
#   bash benchmarks/gpu_smoke.sh [compress.py arguments ...]   # e.g. --set train.epochs=1 for a shorter quickstart
#   PYTHON=/path/to/python KEEP=runs/gpu_smoke bash benchmarks/gpu_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_smoke: torch sees no CUDA device here; nothing to test"
    exit 1
fi
if [ -n "${KEEP:-}" ]; then
    work=$KEEP
    mkdir -p "$work"
else
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
fi

t0=$SECONDS
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests > "$work/pytest.log" 2>&1
tests_rc=$?
tests_s=$((SECONDS - t0))

t0=$SECONDS
"$PY" compress.py --recipe recipes/quickstart.yaml --set device=cuda --out "$work/quickstart" "$@" \
    > "$work/quickstart.log" 2>&1
quickstart_rc=$?
quickstart_s=$((SECONDS - t0))

verdict() { [ "$1" -eq 0 ] && echo ok || echo "FAILED (exit $1)"; }
echo "gpu_smoke: $("$PY" -c "import torch; print(torch.cuda.get_device_name(0) + ', torch ' + torch.__version__ \
    + ', CUDA ' + str(torch.version.cuda))"), onnxruntime providers: $("$PY" -c "import onnxruntime as o; \
    print(', '.join(o.get_available_providers()))" 2>&1)"
echo "  pytest -m gpu: $(verdict $tests_rc) in ${tests_s} s: $(tail -n 1 "$work/pytest.log")"
echo "  quickstart on cuda: $(verdict $quickstart_rc) in ${quickstart_s} s"
if [ $tests_rc -ne 0 ]; then
    echo "--- pytest -m gpu, last lines:"
    tail -n 30 "$work/pytest.log"
fi
if [ $quickstart_rc -eq 0 ]; then
    echo "--- quickstart report ($work/quickstart/report.md):"
    cat "$work/quickstart/report.md"
else
    echo "--- quickstart, last lines:"
    tail -n 30 "$work/quickstart.log"
fi
[ $tests_rc -eq 0 ] && [ $quickstart_rc -eq 0 ]
