#!/usr/bin/env bash
# Create .venv (if missing) and install kvpress-mm into it, editable, with its dev and docs extras.
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
echo "==> installing kvpress-mm (editable) with the dev and docs extras"
"$venv/bin/pip" install --quiet -e '.[dev,docs]'
echo "$want" > "$stamp"
