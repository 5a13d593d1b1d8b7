#!/usr/bin/env bash
# One more training stage of the demo flow, data-parallel on K GPUs (torchrun), then its quality evaluation
# (issue "demo world"): continues from data/demo/flow.pt, writes flow.pt + manifest.json + eval.json +
# flow_samples.png to OUT_DIR. Copy the first two into data/demo/ to adopt the stage.
#   bash tests/benchmarks/train_flow_stage.sh OUT_DIR K MAX_SECONDS [more `demo train` options...]
# e.g. bash tests/benchmarks/train_flow_stage.sh $OUT 4 360 --batch-size 512 --lr 5e-4 --pool 400000 --seed 2
set -eu
out=$1; k=$2; secs=$3; shift 3
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
w=$(mktemp -d)
cp data/demo/* "$w"/ && chmod -R u+w "$w"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
python3 -m torch.distributed.run --standalone --nproc-per-node "$k" -m cli.main demo train --part flow \
  --out "$w" --init data/demo/flow.pt --steps 1000000 --max-seconds "$secs" --device cuda "$@" 2>&1 \
  | tr '\r' '\n' | grep -v "it/s\]$" | tail -n 5
python3 -m cli.main demo manifest --dir "$w"
python3 -m cli.main demo evaluate --dir "$w" --out "$out/eval.json" --grid "$out/flow_samples.png" --device cuda \
  > "$out/evaluate.log" 2>&1
cp "$w/flow.pt" "$w/manifest.json" "$out"/
python3 - "$out/eval.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
f = r["flow"]
print("FD", round(f["frechet_samples_vs_renders"], 2), "renders vs renders", round(f["frechet_renders_vs_renders"], 2))
for name, s in f["factors"].items():
    bad = abs(s["mean_diff"]) > 0.05 or not 0.8 <= s["std_ratio"] <= 1.25
    print(f"{name:22s} mean {s['mean_diff']:+.3f} std {s['std_ratio']:.2f}{'  MISS' if bad else ''}")
for k in ("clip_zero_shot_flow_samples",):
    print(k, {a: round(v["accuracy"], 3) for a, v in r[k].items()})
PY
