#!/usr/bin/env bash
# Optional: llm-compressor 0.14 in its own venv (.venv-llmc), for benchmarks/llm_oneshot.py's
# comparison. Kept apart because it pins transformers<=5.17. torch stays pinned to the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv-llmc/bin/python ] || "$PY" -m venv .venv-llmc
echo "torch==2.13.0" > .venv-llmc/constraints.txt
PIP=(.venv-llmc/bin/python -m pip install --quiet --disable-pip-version-check -c .venv-llmc/constraints.txt)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" llmcompressor==0.14.0.1 accelerate safetensors pyyaml tqdm greenlet
"${PIP[@]}" --no-deps -e .
