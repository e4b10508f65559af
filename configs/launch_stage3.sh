#!/usr/bin/env bash
# LLaVA-Med stage 3 (downstream fine-tuning on a VQA train split) on one node with 8 GPUs.
# Hyperparameters come from configs/stage3_finetune.yaml; override paths with environment variables, e.g.
#   DATA=/data/x.json IMAGES=/data/images OUT=/runs/s3 bash configs/launch_stage3.sh
# Extra arguments are passed on to `llavamed train` (e.g. --lora, --resume, --max-steps 10).
# LAUNCHER=torchrun uses torchrun instead of the deepspeed launcher (the same DeepSpeed config applies).
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-8}
MODEL=${MODEL:-runs/stage2_instruct}
DATA=${DATA:-data/vqa_rad/train.json}
IMAGES=${IMAGES:-data/vqa_rad/images}
OUT=${OUT:-runs/stage3_finetune}
DS=${DS:-zero3}
if [ "${LAUNCHER:-deepspeed}" = torchrun ]; then RUN=(torchrun --nproc_per_node "$NGPU");
else RUN=(deepspeed --num_gpus "$NGPU" --no_local_rank); fi
exec "${RUN[@]}" "$(command -v llavamed)" train \
  --stage configs/stage3_finetune.yaml --model "$MODEL" --data "$DATA" --images "$IMAGES" --out "$OUT" \
  --deepspeed "$DS" --num-workers 4 "$@"
