#!/bin/sh
# Run every state.toml under a Psyche checkout's config/ folder for 3 rounds and print a
# table: config, ran or the reason, overrides used. scripts/psyche_configs.sh PSYCHE_CHECKOUT
set -e
here="$(cd "$(dirname "$0")/.." && pwd)"
[ -x "$here/.venv/bin/python" ] || make -C "$here" .venv/.installed
cd "$here" && exec .venv/bin/python -m scripts.psyche_configs "$@"
