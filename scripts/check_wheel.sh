#!/bin/sh
# The wheel as a user gets it: build it, check its contents and metadata, install it into a
# fresh venv outside the checkout and run the harness's three front-door commands there with
# the shipped configs. scripts/check_wheel.sh [WORKDIR]   (make check-wheel)
# Without WORKDIR it works in a temporary folder removed at the end (a venv with torch is
# over 1 GB, and CI runs this on every push); a WORKDIR given is kept, for a look inside.
set -eu
cd "$(dirname "$0")/.."
checkout="$(pwd)"
if [ $# -ge 1 ]; then
    work="$1"
    where="at $work/venv"
else
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    where="in a temporary folder, removed now"
fi
mkdir -p "$work"
[ -x .venv/bin/python ] || make .venv/.installed

rm -rf "$work/dist"
.venv/bin/python -m build --wheel --outdir "$work/dist" . >"$work/build.log" 2>&1 || { tail -20 "$work/build.log"; exit 1; }
wheel="$(ls "$work"/dist/*.whl)"
rm -rf build   # setuptools' scratch folder in the checkout
.venv/bin/check-wheel-contents "$wheel"
.venv/bin/twine check --strict "$wheel"

# A clean venv, the CPU torch as scripts/setup_venv.sh picks it (the wheel only admits torch).
python="${PYTHON:-python3}"
rm -rf "$work/venv"
"$python" -m venv "$work/venv"
if [ -n "${TORCH_INDEX_URL:-}" ]; then extra="--extra-index-url $TORCH_INDEX_URL"; else extra=""; fi
# shellcheck disable=SC2086
"$work/venv/bin/python" -m pip install $extra "torch==2.13.0+cpu" "$wheel" >"$work/install.log" 2>&1 \
    || { tail -20 "$work/install.log"; exit 1; }

run() { echo "+ $*"; "$@"; }
cd "$work"   # nothing of the checkout on the path from here on
[ "$("$work/venv/bin/python" -c 'import sim; print(sim.__file__)')" != "${checkout}/sim/__init__.py" ]
run "$work/venv/bin/matsim" testnet start --config-path tiny --client-matformer-tiers 0,1,1 --rounds 5 \
    --headless --tui false --seed 0 --out "$work/testnet"
run "$work/venv/bin/matsim" matrix --config-path ffn-small --rounds 20 --out "$work/matrix"
run "$work/venv/bin/matsim" vectors export --out "$work/vectors" --cases-per-op 4
run "$work/venv/bin/matsim" vectors check "$work/vectors" --impl "$work/venv/bin/python -m sim.conformance"
echo "wheel ok: $(basename "$wheel") in a clean venv $where"
