#!/usr/bin/env sh
# Create and fill the virtual environment that `make run` and `make test` use.
#
# torch: an interpreter that already has torch (e.g. a CUDA build on a GPU box)
# is reused through --system-site-packages; otherwise a machine with an NVIDIA
# driver gets the default (CUDA) torch==2.13.0 and any other machine the CPU
# build torch==2.13.0+cpu. The +cpu local version can only resolve to a CPU
# wheel, so a machine without CUDA never downloads several GB of CUDA libraries:
# if no index offers it, set TORCH_INDEX_URL to PyTorch's CPU wheel index.
set -eu
venv="${1:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    if "$python" -c "import torch" 2>/dev/null; then
        echo "setup: keeping the existing torch $("$python" -c 'import torch; print(torch.__version__)')"
        "$python" -m venv --system-site-packages "$venv"
    else
        "$python" -m venv "$venv"
    fi
fi
py="$venv/bin/python"

if ! "$py" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        spec="torch==2.13.0"
    else
        spec="torch==2.13.0+cpu"
    fi
    echo "setup: installing $spec"
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        "$py" -m pip install --extra-index-url "$TORCH_INDEX_URL" "$spec"
    else
        "$py" -m pip install "$spec"
    fi
fi
"$py" -m pip install -e ".[test,docs]"
