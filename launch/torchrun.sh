#!/usr/bin/env bash
# A stage (or the whole pipeline) on all GPUs of a machine without SLURM: torchrun starts one
# rank per GPU; every rank runs `fit`, stage 0 shards the images, the trainings use DDP.
#   bash launch/torchrun.sh stage=0 experiment=voc_stableseg paths.data_dir=/data
# Several machines: run it on each with NNODES, NODE_RANK and MASTER_ADDR set, e.g.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash launch/torchrun.sh stage=1
set -euo pipefail
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
NNODES=${NNODES:-1}
if [ "$NNODES" -gt 1 ]; then
  RDZV=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-29500}")
else
  RDZV=(--standalone)
fi
exec torchrun "${RDZV[@]}" --nproc_per_node="$GPUS" -m stableseg_pp.fit \
  trainer=gpu trainer.devices="$GPUS" trainer.num_nodes="$NNODES" "$@"
