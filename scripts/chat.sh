#!/usr/bin/env bash
# Set up (first run only) and chat with the default model on the CPU.
# Extra arguments go to `lingli chat`, e.g. scripts/chat.sh --model DIR --temperature 0
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/lingli chat "$@"
