#!/usr/bin/env bash
# Multi-GPU scaling of discover-directions under torchrun (issue "GPU performance", item 4).
#   bash tests/benchmarks/scale_torchrun.sh OUT_DIR [N_IMAGES] [BATCH] [PROCESS_COUNTS] [EXTRA_OPTIONS]
# Runs the same job with 1 and 2 processes (one GPU each), then 1 again (run-to-run spread; PROCESS_COUNTS,
# default "1 2 1", changes the sequence), prints the job seconds reported by rank 0 and the relative
# difference of the stored directions. EXTRA_OPTIONS go to discover-directions (e.g. "--off-axis-weight 0",
# old's settings before its registry recipe; "--aggregator mean" since its recipe became the joint method).
set -eu
out=${1:-bench_out/scale}; n=${2:-512}; bs=${3:-32}; counts=${4:-1 2 1}; extra=${5:-}; mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name --format=csv,noheader
for k in $counts; do
  rm -f "$out/k$k.h5"
  s=$(date +%s%N)
  python3 -m torch.distributed.run --standalone --nproc-per-node "$k" -m cli.discover --attr old \
    --n-images "$n" --batch-size "$bs" --device cuda --out "$out/k$k.h5" $extra 2>&1 | tr '\r' '\n' | grep "images ok"
  echo "k=$k wall $(( ($(date +%s%N) - s) / 1000000 )) ms"
done
python3 - "$out" <<'PY'
import sys, h5py, numpy as np
a = h5py.File(f"{sys.argv[1]}/k1.h5", "r")["directions/old/vector"][()]
b = h5py.File(f"{sys.argv[1]}/k2.h5", "r")["directions/old/vector"][()]
print("direction max |1-proc - 2-proc| / max |1-proc| =", float(np.abs(a - b).max() / np.abs(a).max()))
PY
