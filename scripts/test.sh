#!/usr/bin/env bash
# Set up .venv if needed, then run the checks: ruff, mypy and the test suite.
#
#   ./scripts/test.sh                 # everything
#   ./scripts/test.sh -k cli          # extra arguments go to pytest
#
# Every step runs; the script fails if any of them failed. pytest's exit code 5 ("no tests
# collected") counts as a failure, like any other non-zero code.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh" || exit 1
cd "$repo"

# the tests build tiny models from configs: nothing may come from the network
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

failed=()
step() {
    echo "==> $*"
    "$@"
    local code=$?
    if [ "$code" -ne 0 ]; then
        echo "==> FAILED (exit $code): $*" >&2
        failed+=("$1")
    fi
}

step .venv/bin/ruff check kvpress_mm tests
step .venv/bin/mypy
step .venv/bin/pytest -q "$@"

if [ "${#failed[@]}" -ne 0 ]; then
    echo "==> failed: ${failed[*]}" >&2
    exit 1
fi
echo "==> all checks passed"
