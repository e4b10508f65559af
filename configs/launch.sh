# Sourced by configs/launch_stage{1,2,3}.sh (not run alone): starts `llavamed train` with $RECIPE on one node
# or several. The stage script sets MODEL, DATA, IMAGES, OUT, DS and RECIPE; these variables choose the launch:
#
#   NGPU=8                     processes (GPUs) per node
#   LAUNCHER=deepspeed         or torchrun; the same DeepSpeed config ($DS) applies to both
#   NNODES=1 NODE_RANK=0       several nodes, the script run once on every node with its own NODE_RANK
#   MASTER_ADDR=127.0.0.1      node 0's address, reachable from every node
#   MASTER_PORT=29500          a free port on node 0
#   HOSTFILE=                  the deepspeed launcher's hostfile ("HOST slots=N" per line): the script is run once,
#                              on node 0, and DeepSpeed starts the other nodes over ssh (pdsh); with NO_SSH=1 it is
#                              run on every node instead, with its NODE_RANK, and nothing uses ssh
#
# Two nodes with torchrun (run on both; node 1 with NODE_RANK=1):
#   LAUNCHER=torchrun NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash configs/launch_stage2.sh
# Two nodes with the deepspeed launcher and a hostfile, from node 0 only:
#   HOSTFILE=configs/hostfile MASTER_ADDR=10.0.0.1 bash configs/launch_stage2.sh
NGPU=${NGPU:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
HOSTFILE=${HOSTFILE:-}
LAUNCHER=${LAUNCHER:-deepspeed}
fail() { echo "$(basename "$0"): $*" >&2; exit 2; }
case "$LAUNCHER" in
  torchrun)
    [ -z "$HOSTFILE" ] || fail "HOSTFILE is read by the deepspeed launcher; with torchrun run this script on every node with NNODES and NODE_RANK"
    RUN=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NGPU"
         --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT") ;;
  deepspeed)
    if [ -n "$HOSTFILE" ]; then
      [ -f "$HOSTFILE" ] || fail "HOSTFILE=$HOSTFILE: no such file"
      RUN=(deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank)
      if [ "${NO_SSH:-0}" = 1 ]; then RUN+=(--no_ssh --node_rank "$NODE_RANK"); fi
    elif [ "$NNODES" -gt 1 ]; then
      fail "NNODES=$NNODES with the deepspeed launcher needs HOSTFILE (or use LAUNCHER=torchrun)"
    else
      RUN=(deepspeed --num_gpus "$NGPU" --master_port "$MASTER_PORT" --no_local_rank)
    fi ;;
  *) fail "LAUNCHER=$LAUNCHER: want deepspeed or torchrun" ;;
esac
exec "${RUN[@]}" "$(command -v llavamed)" train \
  --stage "$RECIPE" --model "$MODEL" --data "$DATA" --images "$IMAGES" --out "$OUT" \
  --deepspeed "$DS" --num-workers "${NUM_WORKERS:-4}" "$@"
