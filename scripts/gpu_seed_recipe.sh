#!/usr/bin/env bash
# One GPU run, time-boxed: tests/test_cuda.py and the speed of the fast model on CUDA (fp32 and bf16 autocast), then
# the seed-recipe run of resume/seed_recipe/ finished to its 6000 iterations, then continued
# with the learning rate decayed on a cosine for as many iterations as the time left allows.
# Each stage's model is evaluated on all 10,000 test images.
#
#   OUT=runs/gpu BUDGET_S=480 bash scripts/gpu_seed_recipe.sh
#
# Writes to $OUT: run.log, bench_cuda.json, seed_recipe_6000.pt (the run's resumable
# checkpoint at 6000) + .json (10k metrics), seed_recipe_ext.pt + .json (the continuation).
# PY picks the interpreter (default python3); the package runs from this tree (PYTHONPATH).
# START=a run's last.pt continues that run instead (stage 2 then has nothing left to do, and its
# model is not evaluated again).
# For a dry run on a CPU: ITERS1=4252 EXTRA=2 SKIP_BENCH=1 EVAL_LIMIT=200 RESERVE_S=10.
set -u -o pipefail
OUT=${OUT:-runs/gpu}
BUDGET_S=${BUDGET_S:-480}     # the whole script, seconds
PY=${PY:-python3}
RESERVE_S=${RESERVE_S:-60}    # kept for the last evaluation and copies
mkdir -p "$OUT" runs/gpu_seed_recipe runs/gpu_seed_recipe_ext
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
exec > >(tee "$OUT/run.log") 2>&1
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }
minutes() { awk -v s="$(( $(left) - RESERVE_S ))" 'BEGIN { printf "%.2f", (s > 6 ? s : 6) / 60 }'; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== 1. the CUDA path's tests, then speed: fast model fp32 vs bf16 autocast (the oracle is CPU-only)"
  timeout 90 $PY -m pytest -q -o addopts="-p no:cacheprovider" tests/test_cuda.py
  timeout 100 $PY benchmarks/bench_model.py --device cuda --only-fast --amp --repeats 1 \
    --iterations 10 --json "$OUT/bench_cuda.json"
fi

evaluate() {  # run checkpoint -> exported model -> 10k metrics JSON
  $PY -m glom_mnist export "$1" "$2" && \
  $PY -m glom_mnist evaluate --checkpoint "$2" --batch-size 1000 ${EVAL_LIMIT:+--limit $EVAL_LIMIT} \
    --json "${2%.pt}.json"
}

echo "== 2. finish the seed recipe (resume/seed_recipe, constant lr 0.01) to its last iteration; $(left) s left"
cp "${START:-resume/seed_recipe/last.pt}" runs/gpu_seed_recipe/last.pt
timeout $(( $(left) - RESERVE_S )) $PY -m glom_mnist train --resume runs/gpu_seed_recipe/last.pt \
  --out-dir runs/gpu_seed_recipe --checkpoint-every 500 --max-minutes $(minutes) \
  ${ITERS1:+--iterations $ITERS1}
cp runs/gpu_seed_recipe/last.pt "$OUT/seed_recipe_6000.pt"
[ -n "${START:-}" ] || { evaluate runs/gpu_seed_recipe/last.pt runs/gpu_seed_recipe/model.pt && \
  cp runs/gpu_seed_recipe/model.json "$OUT/seed_recipe_6000.json"; }

# seconds per iteration on this machine, from the last 200 iterations of the log
SPI=$($PY -c "
import csv; rows = list(csv.DictReader(open('runs/gpu_seed_recipe/log.csv')))[-200:]
print(max(1e-3, (float(rows[-1]['wall']) - float(rows[0]['wall'])) / max(1, len(rows) - 1)))")
DONE=$($PY -c "import csv; print(list(csv.DictReader(open('runs/gpu_seed_recipe/log.csv')))[-1]['iteration'].split('.')[0])")
EXTRA=${EXTRA:-$($PY -c "print(max(0, int(($(left) - 2 * $RESERVE_S) / ($SPI * 1.15)) // 500 * 500))")}
echo "== 3. $SPI s/iteration; continue from $DONE for $EXTRA iterations, cosine lr; $(left) s left"
if [ "$EXTRA" -gt 0 ]; then
  cp runs/gpu_seed_recipe/last.pt runs/gpu_seed_recipe_ext/last.pt
  timeout $(( $(left) - RESERVE_S )) $PY -m glom_mnist train --resume runs/gpu_seed_recipe_ext/last.pt \
    --out-dir runs/gpu_seed_recipe_ext --iterations $(( DONE + EXTRA )) --schedule cosine \
    --eval-every 500 --checkpoint-every 500 --max-minutes $(minutes)
  cp runs/gpu_seed_recipe_ext/last.pt "$OUT/seed_recipe_ext.pt"
  evaluate runs/gpu_seed_recipe_ext/last.pt runs/gpu_seed_recipe_ext/model.pt && \
    cp runs/gpu_seed_recipe_ext/model.json "$OUT/seed_recipe_ext.json"
fi
echo "== done in $(( $(date +%s) - start )) s"
