#!/usr/bin/env bash
# One GPU lease, time-boxed: the run waiting for a GPU continued, stopping resumably when the time
# is up, then measured on validation scenes:
#   - random scenes: the random-scene model with every two objects' top levels pushed apart
#     (resume/scenes/random_everywhere.pt, resume/README.md), a longer stage of 64 scenes an
#     iteration, or continued from runs/random_gpu/last.pt when an earlier lease started it.
#
#   OUT=runs/gpu BUDGET_S=480 bash scripts/gpu_resume.sh
#
# Needs MNIST prepared under data/ (`make data`). Writes the run's folder under runs/ and, to
# $OUT, a .tar of it (checkpoints, log, validation metrics) and the log's tail. PY picks the
# interpreter (default python3); the package runs from this tree.
set -u
OUT=${OUT:-runs/gpu}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
START=$(date +%s)
TRAIN_END=$((START + ${BUDGET_S:-480}))
mkdir -p "$OUT/logs"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
G="$PY -m glom_mnist"
minutes() { $PY -c "import time; print(round(max(0.1, ($TRAIN_END - time.time()) / 60), 2))"; }
mark() { echo "$1 at $(( $(date +%s) - START )) s" >> "$OUT/logs/timeline.txt"; }

random_scenes() {
  local R=runs/random_gpu
  mkdir -p $R
  local run="--preset patch --scenes random --init resume/scenes/random_everywhere.pt
    --set kernel=5 --val 5000 --eval-images 500 --eval-every 1000 --batch-size 64 --lr 3e-4
    --optimizer adamw --weight-decay 0.05 --warmup 50 --schedule cosine --iterations 10000
    --loss cross_entropy --island-weight 5 --island-apart-everywhere --island-boundary 1 --out-dir $R"
  [ -f $R/last.pt ] && run="--resume $R/last.pt"
  $G train $run --device $DEVICE --checkpoint-minutes 1 --max-minutes "$(minutes)" \
    --save $R/model.pt
  mark "random scenes stopped"
  $G scenes --checkpoint $R/last.pt --device $DEVICE --kind random --scenes 500 --val 5000 \
    --batch-size 25 --tau 0.9 0.95 --json $R/val_random.json --force
  mark "random scenes measured on validation scenes"
}

random_scenes > "$OUT/logs/scenes_random.log" 2>&1
tar cf "$OUT/scenes.tar" runs/random_gpu
for f in "$OUT"/logs/*.log; do tail -c 4000 "$f" > "${f%.log}_tail.txt"; done
ls -la "$OUT"
