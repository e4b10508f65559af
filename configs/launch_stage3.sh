#!/usr/bin/env bash
# LLaVA-Med stage 3 (downstream fine-tuning on a VQA train split) with 8 GPUs per node, on one node or several.
# Hyperparameters come from configs/stage3_finetune.yaml; override paths with environment variables, e.g.
#   DATA=/data/x.json IMAGES=/data/images OUT=/runs/s3 bash configs/launch_stage3.sh
# Extra arguments are passed on to `llavamed train` (e.g. --lora, --resume, --max-steps 10).
# Several nodes (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, or a DeepSpeed HOSTFILE) and the launcher
# (LAUNCHER=torchrun or deepspeed): see configs/launch.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-runs/stage2_instruct}
DATA=${DATA:-data/vqa_rad/train.json}
IMAGES=${IMAGES:-data/vqa_rad/images}
OUT=${OUT:-runs/stage3_finetune}
DS=${DS:-zero3}
RECIPE=configs/stage3_finetune.yaml
source configs/launch.sh
