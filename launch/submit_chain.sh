#!/usr/bin/env bash
# Submit stages 0, 1 and 2 as a chain of SLURM jobs (each starts when the previous one ended
# well: --dependency=afterok). Any fit override can follow, e.g.
#   bash launch/submit_chain.sh experiment=voc_stableseg trainer=gpu trainer.devices=4 trainer.num_nodes=2 launcher.partition=gpu
# --dry-run writes and prints the batch scripts without submitting them.
set -euo pipefail
exec python -m stableseg_pp.launch.slurm --submit "$@"
