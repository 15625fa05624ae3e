#!/usr/bin/env bash
# Stage 0 on all GPUs of one machine. Lightning starts one process per GPU and
# shards the images across them (predict loop + prediction writer); each rank
# loads the diffusion model itself and all ranks agree on the run directory.
#   bash launch/torchrun_stage0.sh experiment=voc_stableseg paths.data_dir=/data
set -euo pipefail
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
python -m stableseg_pp.fit stage=0 trainer=gpu trainer.devices="$GPUS" trainer.strategy=ddp "$@"
