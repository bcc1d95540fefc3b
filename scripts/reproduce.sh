#!/bin/sh
# Replay a property failure from its record: scripts/reproduce.sh results/failures/<test>.json
set -e
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make .venv/.installed
exec .venv/bin/python -m properties.reproduce "$@"
