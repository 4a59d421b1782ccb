#!/usr/bin/env bash
# The GPU checks, time-boxed: the CUDA tests, then the fast model's speed on CUDA (float32 and
# bfloat16 autocast, then with its steps compiled by torch.compile); docs/speed.md has the results.
#
#   OUT=runs/gpu bash scripts/gpu_checks.sh
#
# Writes to $OUT: checks.log, cuda.json, cuda_compiled.json (benchmarks/bench_model.py's output).
# PY picks the interpreter (default python3); the package runs from this tree (PYTHONPATH).
set -u -o pipefail
OUT=${OUT:-runs/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec > >(tee "$OUT/checks.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
status=0
$PY -m pytest -q -o "addopts=-m 'not slow'" -p no:cacheprovider tests/test_cuda.py tests/test_model.py || status=1
$PY benchmarks/bench_model.py --device cuda --only-fast --amp --repeats 3 --iterations 5 \
    --json "$OUT/cuda.json" || status=1
$PY benchmarks/bench_model.py --device cuda --only-fast --compile --repeats 1 --iterations 5 \
    --json "$OUT/cuda_compiled.json" || status=1
exit $status
