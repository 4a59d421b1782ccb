#!/usr/bin/env bash
# One GPU lease, time-boxed: the runs waiting for a GPU continued at once, side by side on the
# one GPU, each stopping resumably when the time is up:
#   - Fashion-MNIST: a wider `patch` model (96 dimensions a level, 390,826 parameters) from
#     scratch, or continued from resume/fashion_wide, since glom_fashion.pt (64) underfits;
#
#   OUT=runs/gpu BUDGET_S=480 bash scripts/gpu_resume.sh
#
# Needs MNIST and Fashion-MNIST prepared under data/ (`make data fashion-mnist`). Writes each
# run's folder under runs/ and, to $OUT, one .tar of each (their checkpoints, logs and metrics)
# and the logs. PY picks the interpreter (default python3); the package runs from this tree.
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

fashion_wide() {
  local R=runs/fashion_wide
  mkdir -p $R
  if [ ! -f $R/last.pt ] && [ -f resume/fashion_wide/last.pt ]; then
    cp resume/fashion_wide/last.pt $R/
  fi
  local run="--preset patch --set dim=96 --dataset fashion-mnist --val 5000 --eval-images 5000
    --eval-every 1000 --batch-size 128 --lr 2e-3 --optimizer adamw --weight-decay 0.05
    --warmup 200 --schedule cosine --shift 2 --iterations 12000 --loss cross_entropy --out-dir $R"
  [ -f $R/last.pt ] && run="--resume $R/last.pt"
  $G train $run --device $DEVICE --checkpoint-minutes 1 --max-minutes "$(minutes)" \
    --save $R/model.pt
  mark "fashion stopped"
}

fashion_wide > "$OUT/logs/fashion.log" 2>&1 &
wait
mark "all stopped"
tar cf "$OUT/fashion.tar" runs/fashion_wide
for f in "$OUT"/logs/*.log; do tail -c 4000 "$f" > "${f%.log}_tail.txt"; done
ls -la "$OUT"
