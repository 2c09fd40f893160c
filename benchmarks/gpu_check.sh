#!/usr/bin/env bash
# The GPU check: device and build, SFT step time GPU vs CPU on the same batch, peak memory per memory setting,
# rollout tokens/s per engine, DP-SGD on the GPU with the LoRA-update sanity check, and two rounds of
# configs/paper/one-gpu-small.yaml with success per environment. Prints one JSON object (the last line) and
# finishes within 8 minutes on one GPU (--budget-s, 450 s by default). Without a GPU (or with --reduced) it runs a
# reduced form on the CPU. --sections and --fedse-rounds pick what runs: benchmarks/gpu_check.py. Exit status 0
# when every part worked.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "$PY" benchmarks/gpu_check.py "$@"
