#!/usr/bin/env bash
# Create benchmarks/.kvpress-venv with NVIDIA kvpress 0.5.5 for `python -m benchmarks.kvpress_compare`.
#
#   bash benchmarks/setup_kvpress_env.sh            # from anywhere
#   PYTHON=python3.11 bash benchmarks/setup_kvpress_env.sh
#
# kvpress 0.5.5 needs transformers < 5.3 while kvpress-mm is tested with transformers 5.24, so
# kvpress lives in its own virtual environment; kvpress_compare runs its kvpress side there as a
# subprocess (python -m benchmarks.kvpress_compare.kvpress_side, from the repository's root: it
# imports the benchmarks harness, never kvpress_mm). torch is installed FIRST and pinned to the
# CPU build 2.13.0 (the same as .venv): a bare `torch` requirement would pull a multi-GB CUDA build.
# Re-runs are no-ops once kvpress imports.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${KVPRESS_VENV:-$here/.kvpress-venv}"
python="${PYTHON:-python3}"

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import kvpress, torch, transformers" 2>/dev/null; then
    echo "==> $venv is ready: $("$venv/bin/python" -c 'import importlib.metadata as m; print("kvpress", m.version("kvpress"), "transformers", m.version("transformers"), "torch", m.version("torch"))')"
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
echo "==> installing torch==2.13.0 (CPU build)"
"$venv/bin/pip" install --quiet "torch==2.13.0"
echo "==> installing kvpress==0.5.5 with a transformers it supports (< 5.3)"
# torch stays pinned so that the resolver never swaps it for a CUDA build
"$venv/bin/pip" install --quiet "kvpress==0.5.5" "transformers>=4.56,<5.3" "torch==2.13.0"
"$venv/bin/python" -c 'import importlib.metadata as m; print("==> ready: kvpress", m.version("kvpress"), "transformers", m.version("transformers"), "torch", m.version("torch"))'
