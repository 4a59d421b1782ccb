#!/usr/bin/env bash
# One GPU run for the scene model, time-boxed: a further stage of best_models/glom_scenes.pt with
# the options of its last stage (docs/results.md, "Islands that last") at a GPU's batch size,
# exported, then measured on the validation scenes and pairs, never on the test set. The stage's
# length is planned from a short probe of this machine's speed, so that its cosine schedule ends
# inside the budget.
#
#   OUT=runs/gpu BUDGET_S=480 bash scripts/gpu_scenes.sh
#
# Writes to $OUT: run.log, scenes.pt (the stage's model, exported with its whole history),
# val_random.json (500 validation scenes at its 16 steps), val_random_20.json (4 steps past
# them), val_pairs.json (500 validation pairs), failures.json (where its islands fail).
# BATCH, LR and AMP=1 change the stage (defaults 256 scenes, lr 2e-4, float32); START another
# model to begin from; FORCE=1 replaces what an earlier run left. PY picks the interpreter
# (default python3); the package runs from this tree.
# For a dry run on a CPU: BATCH=2 PROBE=2 ITERS=3 VAL_SCENES=4 RESERVE_S=30 BUDGET_S=300.
set -u -o pipefail
OUT=${OUT:-runs/gpu}
BUDGET_S=${BUDGET_S:-480}     # the whole script, seconds
RESERVE_S=${RESERVE_S:-120}   # kept for the export and the validation measurements
BATCH=${BATCH:-256}
LR=${LR:-2e-4}
PROBE=${PROBE:-20}            # iterations of the speed probe
VAL_SCENES=${VAL_SCENES:-500}
START=${START:-best_models/glom_scenes.pt}
PY=${PY:-python3}
RUNS=${RUNS:-runs}            # where the probe's and the stage's run folders go
for earlier in "$OUT/scenes.pt" "$OUT/val_random.json" "$RUNS/gpu_scenes_probe" "$RUNS/gpu_scenes"; do
  if [ -e "$earlier" ] && [ -z "${FORCE:-}" ]; then
    echo "gpu_scenes.sh: $earlier is left from an earlier run; move it away," \
      "or set FORCE=1 to replace it"
    exit 2
  fi
done
mkdir -p "$OUT"
rm -rf "$RUNS/gpu_scenes_probe" "$RUNS/gpu_scenes"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
exec > >(tee "$OUT/run.log") 2>&1
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# the last stage's model and loss; only the batch, the learning rate and the length change
stage() {  # out-dir iterations [extra train options]
  local dir=$1 iterations=$2; shift 2
  $PY -m glom_mnist train --preset patch --scenes random --init "$START" --set kernel=5 \
    --set top_kernel=7 --set steps=16 --set loss_steps=12 --val 5000 --batch-size "$BATCH" \
    --lr "$LR" --optimizer adamw --weight-decay 0.05 --schedule cosine --loss cross_entropy \
    --island-weight 5 --island-apart-everywhere --island-boundary 1 --island-hold 1 \
    ${AMP:+--amp} --iterations "$iterations" --out-dir "$dir" "$@"
}

echo "== 1. probe: $PROBE iterations of $BATCH scenes; $(left) s left"
stage "$RUNS/gpu_scenes_probe" "$PROBE" --warmup 1 --eval-images 25 --eval-every "$PROBE" || exit 1
# seconds per iteration, from the probe's second half (the first pays for start-up)
SPI=$($PY -c "
import csv; rows = list(csv.DictReader(open('$RUNS/gpu_scenes_probe/log.csv')))
rows = rows[len(rows) // 2:]
print(max(1e-3, (float(rows[-1]['wall']) - float(rows[0]['wall'])) / max(1, len(rows) - 1)))")
ITERS=${ITERS:-$($PY -c "print(max(2, int(($(left) - $RESERVE_S) / ($SPI * 1.2))))")}
MINUTES=$($PY -c "print(round(max(0.1, ($(left) - $RESERVE_S) / 60), 2))")

echo "== 2. the stage: $SPI s/iteration, so $ITERS iterations (cosine lr from $LR); $(left) s left"
stage "$RUNS/gpu_scenes" "$ITERS" --warmup $(( ITERS / 20 + 1 )) --eval-images 200 \
  --eval-every $(( ITERS / 4 + 1 )) --checkpoint-every 500 --max-minutes "$MINUTES" || exit 1
$PY -m glom_mnist export "$RUNS/gpu_scenes/last.pt" "$OUT/scenes.pt" --force || exit 1

echo "== 3. validation scenes and pairs (the rule's numbers); $(left) s left"
status=0
measure() { $PY -m glom_mnist scenes --checkpoint "$OUT/scenes.pt" --scenes "$VAL_SCENES" --val 5000 \
  --batch-size 25 --tau 0.9 0.95 --force "$@" || status=1; }
measure --kind random --json "$OUT/val_random.json"
measure --kind random --steps 20 --json "$OUT/val_random_20.json"
measure --kind pair --json "$OUT/val_pairs.json"
$PY scripts/island_failures.py --checkpoint "$OUT/scenes.pt" --scenes $(( (VAL_SCENES * 2 + 4) / 5 )) \
  > "$OUT/failures.json" || status=1
echo "== done in $(( $(date +%s) - start )) s"
exit $status
