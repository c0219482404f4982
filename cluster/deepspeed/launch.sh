#!/bin/bash
# CogVideo training through the DeepSpeed launcher, on one node or many.
#
#   cluster/deepspeed/launch.sh [--dry-run] [--gpus N] -- --config run.yaml [key=value ...]
#       one node: N GPUs (default: all the launcher finds)
#   cluster/deepspeed/launch.sh [--dry-run] --hostfile FILE -- --config run.yaml [...]
#       several nodes: FILE lists '<host> slots=<gpus>' (see hostfile.example); the runner
#       starts the ranks over pdsh/ssh from this node.
#   cluster/deepspeed/launch.sh [--dry-run] --slurm --hostfile FILE -- ...
#       inside a SLURM allocation: FILE is first written from SLURM_JOB_NODELIST
#       (cluster/slurm_env.py); cluster/slurm/train.sbatch uses this with LAUNCHER=deepspeed.
#
# Needs passwordless ssh between the hosts and the same repository path + venv on each.
# NCCL_* and PYTHON* variables reach the remote ranks by themselves; the others from
# cluster/slurm/nccl.env go through DS_ENV_FILE, written next to the hostfile.
set -euo pipefail

usage() {
    echo "usage: $0 [--dry-run] [--gpus N | [--slurm] --hostfile FILE] [--master-port P] -- TRAIN_ARGS..." >&2
    exit 2
}

DRY_RUN=0
GPUS=""
HOSTFILE=""
FROM_SLURM=0
MASTER_PORT="${MASTER_PORT:-29500}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --gpus) GPUS="${2:?--gpus needs a count}"; shift 2 ;;
        --slurm) FROM_SLURM=1; shift ;;
        --hostfile) HOSTFILE="${2:?--hostfile needs a path}"; shift 2 ;;
        --master-port) MASTER_PORT="${2:?--master-port needs a port}"; shift 2 ;;
        --) shift; break ;;
        *) echo "unknown option: $1" >&2; usage ;;
    esac
done
[[ $# -gt 0 ]] || usage
[[ "$FROM_SLURM" == 0 || -n "$HOSTFILE" ]] || { echo "--slurm needs --hostfile PATH to write" >&2; exit 2; }
PYTHON="${PYTHON:-python}"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO_DIR"

run() {
    if [[ "$DRY_RUN" == 1 ]]; then
        printf '%q ' "$@"
        echo
        exit 0
    else
        exec "$@"
    fi
}

# shellcheck source=cluster/slurm/nccl.env
source cluster/slurm/nccl.env
if [[ -z "$HOSTFILE" ]]; then
    gpu_args=()
    [[ -n "$GPUS" ]] && gpu_args=(--num_gpus "$GPUS")
    run deepspeed "${gpu_args[@]}" --master_port "$MASTER_PORT" --module pretrain.train "$@"
fi

if [[ "$DRY_RUN" == 0 ]]; then
    mkdir -p "$(dirname "$HOSTFILE")"
    DS_ENV_FILE="$(dirname "$HOSTFILE")/deepspeed_env"
    env | grep -E '^(TORCH_NCCL_|CUDA_DEVICE_MAX_CONNECTIONS=|OMP_NUM_THREADS=)' > "$DS_ENV_FILE" || true
    export DS_ENV_FILE
fi
if [[ "$FROM_SLURM" == 1 ]]; then
    dry_args=()
    [[ "$DRY_RUN" == 1 ]] && dry_args=(--dry-run)
    exec "$PYTHON" -m cluster.slurm_env deepspeed "${dry_args[@]}" --hostfile "$HOSTFILE" -- "$@"
fi

[[ -f "$HOSTFILE" ]] || { echo "hostfile not found: $HOSTFILE" >&2; exit 2; }
MASTER_ADDR="$(awk '$1 !~ /^#/ && NF { print $1; exit }' "$HOSTFILE")"
[[ -n "$MASTER_ADDR" ]] || { echo "$HOSTFILE lists no hosts" >&2; exit 2; }
run deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    --module pretrain.train "$@"
