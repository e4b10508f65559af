#!/usr/bin/env bash
# LLaVA-Med stage 1 (concept alignment: projector only) on one node with 8 GPUs.
# Hyperparameters come from configs/stage1_align.yaml; override paths with environment variables, e.g.
#   DATA=/data/x.json IMAGES=/data/images OUT=/runs/s1 bash configs/launch_stage1.sh
# Extra arguments are passed on to `llavamed train` (e.g. --lora, --resume, --max-steps 10).
# LAUNCHER=torchrun uses torchrun instead of the deepspeed launcher (the same DeepSpeed config applies).
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-8}
MODEL=${MODEL:-llava-med-v1.5}
DATA=${DATA:-data/llava_med_alignment_500k.json}
IMAGES=${IMAGES:-data/images}
OUT=${OUT:-runs/stage1_align}
DS=${DS:-zero2}
if [ "${LAUNCHER:-deepspeed}" = torchrun ]; then RUN=(torchrun --nproc_per_node "$NGPU");
else RUN=(deepspeed --num_gpus "$NGPU" --no_local_rank); fi
exec "${RUN[@]}" "$(command -v llavamed)" train \
  --stage configs/stage1_align.yaml --model "$MODEL" --data "$DATA" --images "$IMAGES" --out "$OUT" \
  --deepspeed "$DS" --num-workers 4 "$@"
