#!/usr/bin/env bash
# Set up .venv if needed, install the example plugin (examples/kvpress-mm-keynorm) the way a user
# installs a third-party plugin, then run the checks: ruff, mypy, the test suite, the plugin's own
# tests, and `kvpress-mm strategies` listing the plugin's strategy.
#
#   ./scripts/test.sh                 # everything
#   ./scripts/test.sh -k cli          # extra arguments go to the main pytest run (tests/)
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

example="examples/kvpress-mm-keynorm"
example_stamp=".venv/.kvpress-mm-keynorm-installed"

# Editable and without dependencies (kvpress-mm is already installed): fast, works from a fresh
# clone, and re-runs skip the install while the example's pyproject.toml is unchanged.
install_example_plugin() {
    local want
    want="$(.venv/bin/python -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
        "$example/pyproject.toml")" || return 1
    if [ -f "$example_stamp" ] && [ "$(cat "$example_stamp")" = "$want" ] \
        && .venv/bin/python -c "import kvpress_mm_keynorm" 2>/dev/null; then
        echo "$example is installed (delete $example_stamp to reinstall)"
        return 0
    fi
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 .venv/bin/pip install --quiet --no-deps -e "$example" || return 1
    echo "$want" > "$example_stamp"
}

# The console script must list the plugin's strategy, discovered through its entry point.
strategies_list_keynorm() {
    local listing
    listing="$(env -u KVPRESS_MM_DISABLE_PLUGIN_AUTOLOAD .venv/bin/kvpress-mm strategies)" || return 1
    if ! grep -q "^keynorm  \[plugin 'keynorm' (module kvpress_mm_keynorm, distribution kvpress-mm-keynorm " <<<"$listing"; then
        echo "'kvpress-mm strategies' does not list keynorm from the kvpress-mm-keynorm plugin:" >&2
        echo "$listing" >&2
        return 1
    fi
    grep "^keynorm  " <<<"$listing"
}

step install_example_plugin
step .venv/bin/ruff check kvpress_mm tests examples benchmarks
step .venv/bin/mypy
# the benchmarks package (outside the library, not under the strict package check above)
step .venv/bin/mypy --follow-imports=silent benchmarks
# the example only: kvpress_mm itself is checked by the step above
step .venv/bin/mypy --follow-imports=silent "$example/src" "$example/tests"
step .venv/bin/pytest -q "$@"
step .venv/bin/pytest -q "$example/tests"
step strategies_list_keynorm

if [ "${#failed[@]}" -ne 0 ]; then
    echo "==> failed: ${failed[*]}" >&2
    exit 1
fi
echo "==> all checks passed"
