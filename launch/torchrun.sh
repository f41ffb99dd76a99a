#!/usr/bin/env bash
# Launch `pangu pretrain` with torchrun: one node, or several through c10d rendezvous.
#
#   One node:     launch/torchrun.sh --config configs/350m.yaml [--set k=v ...]
#   Many nodes:   run on every node with the same endpoint and id:
#                 NNODES=4 RDZV_ENDPOINT=node0:29500 RDZV_ID=myjob launch/torchrun.sh --config configs/13b.yaml
#
# Environment: NNODES (default 1), NPROC_PER_NODE (default: the node's GPUs, or 1 without GPUs),
# RDZV_ENDPOINT (host:port of the rendezvous; default: a standalone single-node rendezvous),
# RDZV_ID (a name shared by the nodes of one job), MAX_RESTARTS (default 3: when a worker fails,
# torchrun stops the worker group and starts it again, up to this many times; the run resumes
# from its newest intact checkpoint by itself). dp = world size / (parallel.tp x parallel.pp).
# A user's error (a bad value, a damaged file: pangu's exit status 2) is not retried: the job ends
# at once with pangu's line and exit status 2.
set -euo pipefail
NNODES=${NNODES:-1}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
if [ -z "${RDZV_ENDPOINT:-}" ]; then
  [ "$NNODES" = 1 ] || { echo "launch/torchrun.sh: NNODES=$NNODES needs RDZV_ENDPOINT=host:port" >&2; exit 2; }
  rendezvous=(--standalone)
else
  rendezvous=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-pangu}")
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# A restarted worker group must not reuse the agent's c10d store: its keys from the failed attempt
# stay there and the new workers connect to dead peers (pytorch/pytorch#167288). With this, rank 0
# of each attempt hosts a fresh store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# torchrun restarts a worker group whenever a worker fails, and a user's error fails again every
# time. So a worker that fails on one writes its line into this directory and holds (pangu/cli.py);
# this script, watching it, stops torchrun and ends with status 2 and the line.
PANGU_USER_ERROR_DIR=$(mktemp -d "${TMPDIR:-/tmp}/pangu-user-error.XXXXXX")
export PANGU_USER_ERROR_DIR
trap 'rm -rf "$PANGU_USER_ERROR_DIR"' EXIT

# torchrun runs in the background so that this shell, which waits for it, can pass on the signals
# sent to it (SIGTERM from a scheduler, SIGUSR1 before a time limit). Ctrl-C reaches torchrun and
# its workers from the terminal; this shell only outlives it, to report how the job ended.
torchrun_pid=
forward() { [ -n "$torchrun_pid" ] && kill -s "$1" "$torchrun_pid" 2>/dev/null; }
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap ':' INT
torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" "${rendezvous[@]}" \
  --max-restarts "${MAX_RESTARTS:-3}" -m pangu pretrain "$@" &
torchrun_pid=$!
# Wait for torchrun (a trapped signal ends `wait` early: the loop goes on); a user's error reported
# in $PANGU_USER_ERROR_DIR stops it, a few seconds later so that the other ranks' lines are in.
stopping=
while kill -0 "$torchrun_pid" 2>/dev/null; do
  if [ -z "$stopping" ] && compgen -G "$PANGU_USER_ERROR_DIR/rank*" > /dev/null; then
    sleep 3
    stopping=1
    kill -s TERM "$torchrun_pid" 2>/dev/null
  fi
  sleep 1 & wait $!
done
wait "$torchrun_pid" && status=0 || status=$?
errors=("$PANGU_USER_ERROR_DIR"/rank*)
if [ -e "${errors[0]}" ]; then
  echo "launch/torchrun.sh: not restarted, a user's error ($(ls "$PANGU_USER_ERROR_DIR" | wc -l) ranks): $(cat "${errors[0]}")" >&2
  exit 2
fi
exit "$status"
