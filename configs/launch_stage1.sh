#!/usr/bin/env bash
# LLaVA-Med stage 1 (concept alignment: projector only) with 8 GPUs per node, on one node or several.
# Hyperparameters come from configs/stage1_align.yaml; override paths with environment variables, e.g.
#   DATA=/data/x.json IMAGES=/data/images OUT=/runs/s1 bash configs/launch_stage1.sh
# Extra arguments are passed on to `llavamed train` (e.g. --lora, --resume, --max-steps 10).
# Several nodes (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, or a DeepSpeed HOSTFILE) and the launcher
# (LAUNCHER=torchrun or deepspeed): see configs/launch.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-llava-med-v1.5}
DATA=${DATA:-data/llava_med_alignment_500k.json}
IMAGES=${IMAGES:-data/images}
OUT=${OUT:-runs/stage1_align}
DS=${DS:-zero2}
RECIPE=configs/stage1_align.yaml
source configs/launch.sh
