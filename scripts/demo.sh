#!/usr/bin/env bash
# README command 1: install, then run the main job on the embedded default (own Redis, SQLite, one Celery
# worker, the API): train a teacher ReLU SAE on SmolLM2-135M + BBC News, upgrade it through POST /jobs,
# download and verify the artifacts, print teacher vs RSAE metrics. Data in ./var/demo (RSAE_DATA_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec .venv/bin/rsae-service demo "$@"
