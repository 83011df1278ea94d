#!/usr/bin/env bash
# README command 2: install, make sure PostgreSQL (127.0.0.1:5432, database `test`) and Redis
# (127.0.0.1:6379) are up (starting the machine's own servers if they are not), then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/services.sh
exec .venv/bin/python -m pytest "$@"
