#!/bin/bash
# `ray job submit` for CogVideo's Ray jobs on a running cluster (cluster.yaml, or any other).
#
#   ray dashboard cluster/ray/cluster.yaml &        # the job server at localhost:8265
#   cluster/ray/submit.sh prep -- --input /shared/videos --captions /shared/captions.jsonl \
#       --out /shared/shards
#   cluster/ray/submit.sh sample -- --prompts /shared/prompts.txt --out /shared/samples
#   cluster/ray/submit.sh --dry-run prep -- ...      # print the command only
#
# Options: --address URL (default $RAY_ADDRESS or http://127.0.0.1:8265), --bin DIR (where
# the cogvideo-* commands live on the cluster; default the venv cluster.yaml installs),
# --no-wait (return once submitted; follow with `ray job logs -f ID`).
# The job runs on the head; `prep` gets --address auto (join this cluster rather than start
# a local Ray), `sample` gets --ray (use every GPU worker; it joins through RAY_ADDRESS).
# Paths must be valid on the cluster machines.
set -euo pipefail

usage() {
    echo "usage: $0 [--dry-run] [--address URL] [--bin DIR] [--no-wait] {prep|sample} -- ARGS..." >&2
    exit 2
}

DRY_RUN=0
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
# Expanded on the cluster, where the job's shell runs.
# shellcheck disable=SC2088
BIN_DIR="~/cogvideo/.venv/bin"
SUBMIT_OPTS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1; shift ;;
        --address) ADDRESS="${2:?--address needs a URL}"; shift 2 ;;
        --bin) BIN_DIR="${2:?--bin needs a directory}"; shift 2 ;;
        --no-wait) SUBMIT_OPTS+=(--no-wait); shift ;;
        prep|sample) TASK="$1"; shift; break ;;
        *) echo "unknown option: $1" >&2; usage ;;
    esac
done
[[ -n "${TASK:-}" ]] || usage
[[ "${1:-}" == "--" ]] && shift
[[ $# -gt 0 ]] || usage

case "$TASK" in
    prep) ENTRYPOINT=("${BIN_DIR}/cogvideo-prep" --address auto "$@") ;;
    sample) ENTRYPOINT=("${BIN_DIR}/cogvideo-sample" --ray "$@") ;;
esac
SUBMIT=(ray job submit --address "$ADDRESS" "${SUBMIT_OPTS[@]}"
        --submission-id "cogvideo-${TASK}-$(date -u +%Y%m%d-%H%M%S)" -- "${ENTRYPOINT[@]}")

if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "${SUBMIT[@]}"
    echo
    exit 0
fi
exec "${SUBMIT[@]}"
