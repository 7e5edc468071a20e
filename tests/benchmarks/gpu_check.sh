#!/usr/bin/env bash
# The GPU check (issue 13): one table of training, compile, FSDP2, loader and zero-shot
# figures on one GPU in <= 8 minutes; --cpu-smoke runs the same parts on the CPU at tiny
# sizes (tests/test_gpu_check.py). Details: tests/benchmarks/gpu_check.py --help.
#
#   bash tests/benchmarks/gpu_check.sh                 # on a GPU machine
#   bash tests/benchmarks/gpu_check.sh --cpu-smoke     # anywhere
set -euo pipefail
# The repository's own .venv (as launch/setup.sh creates it), from wherever this is run:
# a relative --cache-dir stays relative to the caller's directory.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ ! -x "$root/.venv/bin/python" ]]; then
    echo "gpu_check: no $root/.venv: run 'bash launch/setup.sh' first (README: Set up)" >&2
    exit 2
fi
exec "$root/.venv/bin/python" "$root/tests/benchmarks/gpu_check.py" "$@"
