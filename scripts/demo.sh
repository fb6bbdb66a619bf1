#!/usr/bin/env bash
# Set up .venv if needed, then run the main job: `kvpress-mm demo` on the shipped reference VLM.
#
#   ./scripts/demo.sh                                  # every built-in strategy at ratio 0.5
#   ./scripts/demo.sh --ratio 0.5 --strategies snapkv,lookm-pivotal
#
# Arguments are passed to `kvpress-mm demo` (see `kvpress-mm demo --help`).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
exec "$repo/.venv/bin/kvpress-mm" demo "$@"
