#!/usr/bin/env bash
# Create .venv (if missing) and install kvpress-mm into it, editable, with its dev, docs and quant extras.
#
#   ./scripts/setup.sh            # from the repository root or anywhere else
#   PYTHON=python3.12 ./scripts/setup.sh
#
# torch is installed FIRST and pinned to the CPU build 2.13.0: a bare `torch` requirement would
# pull a multi-GB CUDA build. Re-runs skip the install when pyproject.toml has not changed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

python="${PYTHON:-python3}"
venv=".venv"
stamp="$venv/.kvpress-mm-installed"

if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi

want="$("$venv/bin/python" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import kvpress_mm" 2>/dev/null; then
    echo "==> $venv is up to date (delete $stamp to reinstall)"
    exit 0
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
echo "==> installing torch==2.13.0 (CPU build)"
"$venv/bin/pip" install --quiet torch==2.13.0
# quant (optimum-quanto, hqq) keeps the CPU torch installed above: neither asks for a CUDA build
echo "==> installing kvpress-mm (editable) with the dev, docs and quant extras"
"$venv/bin/pip" install --quiet -e '.[dev,docs,quant]'
# optimum-quanto compiles its CPU kernel (a small C++ extension, with the system's C++ compiler)
# the first time a quantized cache is dequantized: once here, not inside the first test that does
echo "==> building optimum-quanto's CPU kernel (once per install, about a minute)"
if ! "$venv/bin/python" - <<'PY'
import torch
from transformers.cache_utils import QuantoQuantizedLayer

layer = QuantoQuantizedLayer(nbits=4, q_group_size=16)
layer.update(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16))
layer.update(torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16))  # dequantizes: builds the kernel
PY
then
    echo "==> optimum-quanto could not build its CPU kernel: it needs a C++ compiler (g++) and ninja" >&2
    exit 1
fi
echo "$want" > "$stamp"
