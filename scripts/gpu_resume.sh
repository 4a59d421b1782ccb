#!/usr/bin/env bash
# One GPU lease, time-boxed: every run waiting in resume/ continued at once, side by side on the
# one GPU, each stopping resumably when the time is up (resume/README.md describes the runs):
#   - the seed's exact recipe with seed 1 (started, or continued from resume/seed_exact_seed1 if
#     a run is there) to its 6,000 iterations, then exported and evaluated (dropout off, and on
#     with 5 draws), to tell whether best_models/glom_seed_exact.pt's seed 0 was unlucky;
#   - Fashion-MNIST: a wider `patch` model (96 dimensions a level, 390,826 parameters) from
#     scratch, or continued from resume/fashion_wide, since glom_fashion.pt (64) underfits;
#   - scenes: the 16-step stage of the random-scene model of resume/scenes.
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

seed_exact_seed1() {
  local R=runs/seed_exact_seed1
  mkdir -p $R
  if [ ! -f $R/last.pt ] && [ -f resume/seed_exact_seed1/last.pt ]; then
    cp resume/seed_exact_seed1/last.pt $R/
  fi
  local run="--seed 1 --out-dir $R"              # a new run: the defaults are the seed's recipe
  [ -f $R/last.pt ] && run="--resume $R/last.pt"
  $G train $run --device $DEVICE --checkpoint-minutes 1 --max-minutes "$(minutes)" \
    --save $R/model.pt
  mark "seed exact, seed 1, stopped"
  [ -f $R/model.pt ] || return 0
  $G export --force $R/last.pt $R/glom_seed_exact_seed1.pt
  $G evaluate --checkpoint $R/glom_seed_exact_seed1.pt --device $DEVICE --batch-size 500 \
    --json $R/eval.json
  $G evaluate --checkpoint $R/glom_seed_exact_seed1.pt --device $DEVICE --batch-size 500 \
    --dropout --repeats 5 --json $R/eval_dropout.json
  mark "seed exact, seed 1, evaluated"
}

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

scenes_16() {   # kind batch
  local R=runs/scenes_$1/s16
  $G train --preset patch --scenes "$1" --set steps=16 --set loss_steps=8 \
    --init "resume/scenes/$1_s8.pt" --val 5000 --eval-images 500 --eval-every 200 \
    --batch-size "$2" --lr 1e-3 --optimizer adamw --weight-decay 0.05 --warmup 50 \
    --schedule cosine --iterations 800 --loss cross_entropy --device $DEVICE \
    --checkpoint-minutes 1 --out-dir $R --save $R.pt --max-minutes "$(minutes)"
  mark "scenes $1 stopped"
}

seed_exact_seed1 > "$OUT/logs/seed_exact_seed1.log" 2>&1 &
fashion_wide > "$OUT/logs/fashion.log" 2>&1 &
scenes_16 random 64 > "$OUT/logs/scenes_random.log" 2>&1 &
wait
mark "all stopped"
tar cf "$OUT/seed_exact_seed1.tar" runs/seed_exact_seed1
tar cf "$OUT/fashion.tar" runs/fashion_wide
tar cf "$OUT/scenes.tar" runs/scenes_random/s16 runs/scenes_random/s16.pt 2>/dev/null
for f in "$OUT"/logs/*.log; do tail -c 4000 "$f" > "${f%.log}_tail.txt"; done
ls -la "$OUT"
