#!/usr/bin/env bash
# Set up (idempotent), then run the demo: PostgreSQL -> Debezium -> Kafka (tansu) ->
# CDC worker -> Redis and two application processes, every service started by the
# demo on free loopback ports and stopped at the end. Arguments go to the demo
# (`--redis-only` for the two-replica Redis demo without CDC).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m examples.demo "$@"
