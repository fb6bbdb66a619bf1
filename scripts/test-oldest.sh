#!/usr/bin/env bash
# Run the test suite against the OLDEST transformers the package supports: the minimum of its
# `transformers>=X` requirement in pyproject.toml, installed exactly (transformers==X) into a
# second virtual environment, .venv-oldest. (scripts/test.sh tests the newest: .venv gets the
# newest release the requirement allows.)
#
#   ./scripts/test-oldest.sh            # the suite, without the transformers-free layers (below)
#   ./scripts/test-oldest.sh -k qwen    # extra arguments go to pytest
#
# The tests of the pure tensor layers (tests/ops, tests/strategies: synthetic tensors) and the
# static layer check (tests/test_layers.py) are left out: that code never imports transformers
# (tests/test_layers.py enforces it), so they give the same result on every version.
#
# Like setup.sh: torch==2.13.0 (CPU build) first, then the package editable with its dev extras;
# re-runs skip the install while pyproject.toml is unchanged.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

oldest="$(sed -n 's/^ *"transformers>=\([0-9][0-9.]*\),.*/\1/p' pyproject.toml)"
if [ -z "$oldest" ] || [ "$(printf '%s\n' "$oldest" | wc -l)" -ne 1 ]; then
    echo "expected exactly one \"transformers>=X,...\" requirement in pyproject.toml, found: ${oldest:-none}" >&2
    exit 1
fi

python="${PYTHON:-python3}"
venv=".venv-oldest"
stamp="$venv/.kvpress-mm-installed"

if [ ! -x "$venv/bin/python" ]; then
    echo "==> creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi

want="$("$venv/bin/python" -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import kvpress_mm" 2>/dev/null; then
    echo "==> $venv is up to date (delete $stamp to reinstall)"
else
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    echo "==> installing torch==2.13.0 (CPU build)"
    "$venv/bin/pip" install --quiet torch==2.13.0
    echo "==> installing kvpress-mm (editable, dev extras) with transformers==$oldest"
    "$venv/bin/pip" install --quiet -e '.[dev]' "transformers==$oldest"
    echo "$want" > "$stamp"
fi

installed="$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
if ! "$venv/bin/python" -c 'import sys; from packaging.version import Version as V; sys.exit(V(sys.argv[1]) != V(sys.argv[2]))' \
    "$installed" "$oldest"; then
    echo "$venv has transformers $installed, not the oldest supported $oldest" >&2
    exit 1
fi

# the tests build tiny models from configs: nothing may come from the network
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "==> pytest with transformers $installed (the oldest supported)"
"$venv/bin/pytest" -q -p no:cacheprovider --ignore=tests/ops --ignore=tests/strategies --ignore=tests/test_layers.py "$@"
