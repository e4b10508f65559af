#!/usr/bin/env bash
# LLaVA-Med stage 2 (instruction tuning: projector + LLM) with 8 GPUs per node, on one node or several.
# Hyperparameters come from configs/stage2_instruct.yaml; override paths with environment variables, e.g.
#   DATA=/data/x.json IMAGES=/data/images OUT=/runs/s2 bash configs/launch_stage2.sh
# Extra arguments are passed on to `llavamed train` (e.g. --lora, --resume, --max-steps 10).
# Several nodes (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, or a DeepSpeed HOSTFILE) and the launcher
# (LAUNCHER=torchrun or deepspeed): see configs/launch.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-runs/stage1_align}
DATA=${DATA:-data/llava_med_instruct_60k_inline_mention.json}
IMAGES=${IMAGES:-data/images}
OUT=${OUT:-runs/stage2_instruct}
DS=${DS:-zero3}
RECIPE=configs/stage2_instruct.yaml
source configs/launch.sh
