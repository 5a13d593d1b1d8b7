#!/usr/bin/env bash
# Settings study for discover-directions on the demo world (GPU). Tuning uses apply-time samples of seed 555,
# so the reported edit-quality table (seed 777, eval_directions.py defaults) is not fitted to its own images.
#   bash tests/benchmarks/tune_directions.sh OUT_DIR [PARALLEL] [CONFIG_FILE]
# CONFIG_FILE: one 'name --option value ...' per line (default: the study below).
set -u
out=${1:-bench_out/tune}; par=${2:-4}; mkdir -p "$out"
run() {  # name, extra args...
  local name=$1; shift
  python3 tests/benchmarks/eval_directions.py --attrs old smiling --strengths 1 2 --eval-seed 555 \
    --out "$out/$name" "$@" > "$out/$name.log" 2>&1 && tail -n 5 "$out/$name.log" | sed "s/^/$name: /"
}
# First round: one change at a time from the earlier defaults (lr 3, t-window [0, 1]); argparse takes the last value.
old_defaults="--lr 3 --t-window 0 1"
configs=(
  "base"
  "lr6 --lr 6"
  "it12 --iterations 12"
  "alpha09 --alpha 0.9"
  "alpha05 --alpha 0.5"
  "late --t-window 0.3 1"
  "early --t-window 0 0.5"
  "robust --aggregator robust"
  "pc1 --aggregator pc1"
  "n64 --n-images 64"
  "rep8 --replicas 8"
  "lr6it12 --lr 6 --iterations 12"
)
if [ -n "${3:-}" ]; then mapfile -t configs < <(grep -v '^ *#' "$3" | grep -v '^ *$'); fi
for c in "${configs[@]}"; do
  read -r name rest <<< "$c"
  if [ -z "${3:-}" ]; then run "$name" $old_defaults $rest & else run "$name" $rest & fi
  while (( $(jobs -rp | wc -l) >= par )); do wait -n; done
done
wait
