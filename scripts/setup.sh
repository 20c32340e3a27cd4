#!/usr/bin/env bash
# Create .venv and install Lingli into it (editable, C++ extension built).
# Usage: scripts/setup.sh [--test]   (--test adds the test-only dependencies)
# Needs only python3 (with venv), pip and a C++ compiler. Safe to re-run: it
# rebuilds the extension only when setup.py or csrc/ changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LINGLI_VENV:-.venv}"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV" >&2
    python3 -m venv "$VENV"
fi
# torch==2.13.0 is the CPU build on this machine's disk; any other spec pulls CUDA wheels.
CONSTRAINTS=(-c constraints.txt)

stamp="$VENV/.lingli-build-stamp"
want="$(find setup.py pyproject.toml csrc -type f | sort | xargs cat | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] \
        || ! "$VENV/bin/python" -c "import runtime._C" 2>/dev/null; then
    echo "[setup] installing Lingli (builds the C++ extension, ~30 s)" >&2
    "${PIP[@]}" install "${CONSTRAINTS[@]}" -e .
    echo "$want" > "$stamp"
fi

if [ "${1:-}" = "--test" ]; then
    if ! "$VENV/bin/python" -c "import torch, triton, deepspeed, transformers, pytest, pytest_benchmark, runtime._C" 2>/dev/null; then
        echo "[setup] installing test dependencies (torch CPU, triton, deepspeed, transformers, pytest)" >&2
        # DS_BUILD_OPS=0: DeepSpeed's sdist installs without compiling its ops (it JIT-builds them).
        DS_BUILD_OPS=0 "${PIP[@]}" install "${CONSTRAINTS[@]}" -e ".[test]"
    fi
    # Cross toolchain for the aarch64 build check (NEON sources) and the fortune
    # corpora the poet recipe trains on; optional (their tests skip without them).
    if { ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || [ ! -f /usr/share/games/fortunes/tang300 ]; } \
            && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing g++-aarch64-linux-gnu, qemu-user, fortunes-zh, fortunes (apt)" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends g++-aarch64-linux-gnu qemu-user fortunes-zh fortunes >/dev/null) \
            || echo "[setup] apt install failed; the aarch64 and fortune checks will be skipped" >&2
    fi
fi
