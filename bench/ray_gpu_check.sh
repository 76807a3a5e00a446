#!/usr/bin/env bash
# The backends' GPU check, for a machine with a CUDA GPU (a node of the cluster, or a lent device machine):
#   bash bench/ray_gpu_check.sh [MODEL ...]        (default: var-d16 var-d30, random weights: timing only)
# Prints one JSON object (bench/backends.py --gpu): per model, the bf16 teacher-forced scoring throughput with the
# local backend (images/s, achieved TFLOP/s from FlopCounterMode counts, fraction of the H200's bf16 dense peak,
# peak memory) and, where Ray is installed, the same job on two Ray actors sharing the one GPU
# (gpus_per_worker=0.5), compared bit for bit with the local run. A private Ray instance on 127.0.0.1 only;
# no usage statistics; its token lives in this process's environment (nothing is written to ~/.ray).
# About 2-4 minutes on one H200 (most of it building the random 2B-parameter d30 twice on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN="${RAY_AUTH_TOKEN:-$(python3 -c 'import secrets; print(secrets.token_hex(32))')}"
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # deterministic cuBLAS: the same block gives the same bits in every process
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 540 python3 bench/backends.py --n 256 --gpu "$@"
