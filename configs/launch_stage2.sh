#!/usr/bin/env bash
# LLaVA-Med stage 2 (instruction tuning: projector + LLM) on one node with 8 GPUs.
# Hyperparameters come from configs/stage2_instruct.yaml; override paths with environment variables, e.g.
#   DATA=/data/x.json IMAGES=/data/images OUT=/runs/s2 bash configs/launch_stage2.sh
# Extra arguments are passed on to `llavamed train` (e.g. --lora, --resume, --max-steps 10).
# LAUNCHER=torchrun uses torchrun instead of the deepspeed launcher (the same DeepSpeed config applies).
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-8}
MODEL=${MODEL:-runs/stage1_align}
DATA=${DATA:-data/llava_med_instruct_60k_inline_mention.json}
IMAGES=${IMAGES:-data/images}
OUT=${OUT:-runs/stage2_instruct}
DS=${DS:-zero3}
if [ "${LAUNCHER:-deepspeed}" = torchrun ]; then RUN=(torchrun --nproc_per_node "$NGPU");
else RUN=(deepspeed --num_gpus "$NGPU" --no_local_rank); fi
exec "${RUN[@]}" "$(command -v llavamed)" train \
  --stage configs/stage2_instruct.yaml --model "$MODEL" --data "$DATA" --images "$IMAGES" --out "$OUT" \
  --deepspeed "$DS" --num-workers 4 "$@"
