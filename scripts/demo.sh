#!/usr/bin/env bash
# Set up (idempotent), then run the demo; it starts its own Redis via scripts.services.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m examples.demo "$@"
