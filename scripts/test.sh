#!/usr/bin/env bash
# Set up everything the tests need on a fresh machine, then run them.
#   bash scripts/test.sh              # the CI suite (slow sweeps excluded)
#   bash scripts/test.sh -m slow      # extra pytest arguments pass through
# Two pytest-xdist workers, one test file each at a time (module fixtures such as the emulated board
# start once); EDGEATTN_TEST_WORKERS=0 runs everything in this one process (e.g. for pdb).
# Set EDGEATTN_NO_SYSTEM_SETUP=1 to skip the apt/emulator steps (their tests then skip, saying why).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev,opencl]"

if [ -z "${EDGEATTN_NO_SYSTEM_SETUP:-}" ]; then
    # Real OpenCL (PoCL) and the emulated aarch64 device: the target-verification tests run on them.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        need=()
        for pkg in pocl-opencl-icd ocl-icd-libopencl1 qemu-user-static gcc-aarch64-linux-gnu debootstrap; do
            dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
        done
        if [ ${#need[@]} -gt 0 ]; then
            echo "[test.sh] apt-get install ${need[*]}"
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
        fi
    fi
    .venv/bin/python -m edgeattn.devices.arm64_emulator_setup || echo "[test.sh] emulated arm64 set-up failed: its tests will skip"
fi

set +e
.venv/bin/python -m pytest -n "${EDGEATTN_TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "[test.sh] pytest collected no tests: failing on purpose" >&2
    exit 1
fi
exit "$rc"
