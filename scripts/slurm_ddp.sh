#!/usr/bin/env bash
# Multi-node DDP under SLURM: one torchrun per node, rendezvous on the first node of the allocation.
#   sbatch --nodes 2 scripts/slurm_ddp.sh train_mcl_okd.py --arch resnet34 --dataset imagenet --data /data/imagenet \
#       --batch-size 16     # per process: 2 nodes x 8 GPUs x 16 = 256
#SBATCH --job-name=okd
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
set -euo pipefail
# Processes per node: GPUS_PER_NODE if set, else the GPUs SLURM gave each node (sbatch --gpus-per-node N or
# TYPE:N; the 8 above when it says nothing), so a job submitted with --gpus-per-node 4 starts 4 per node.
ALLOCATED=${SLURM_GPUS_ON_NODE:-0}
[[ $ALLOCATED =~ ^[1-9][0-9]*$ ]] || ALLOCATED=${SLURM_GPUS_PER_NODE:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-${ALLOCATED##*:}}
if ! [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]]; then
  echo "error: $GPUS_PER_NODE processes per node (GPUS_PER_NODE, or SLURM's GPUs per node); set GPUS_PER_NODE=N" >&2
  exit 2
fi
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}
# The run directory is the engine's default for the options (runs/<method>-...), or the --out given (or
# OUT=DIR), so a requeued job, a restarted worker and a job submitted again with the same command all continue
# its last.pt (--resume auto). The first argument is the training script; your flags come after it, last, so
# a --resume or --out of yours wins.
SCRIPT=${1:-}
if [[ -z "$SCRIPT" || "$SCRIPT" == -* ]]; then
  echo "error: the first argument is the training script: sbatch scripts/slurm_ddp.sh train_X.py [flags]" >&2
  exit 2
fi
if [[ ! -f "$SCRIPT" ]]; then     # (python, a typo: else every process of every restart says so, then torchrun's trace)
  echo "error: $SCRIPT: no such training script here ($PWD); give the train_X.py file (no 'python' before it)" >&2
  exit 2
fi
shift
srun torchrun \
  --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$GPUS_PER_NODE" \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:$PORT" \
  --max-restarts 3 \
  "$SCRIPT" --resume auto ${OUT:+--out "$OUT"} "$@"
