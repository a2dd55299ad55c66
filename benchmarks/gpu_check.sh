#!/usr/bin/env bash
# The prepared GPU check: one command, no editing, about 5 minutes on one H100 (317 s) or one H200 (235 s).
#
#   bash benchmarks/gpu_prepare.sh      # first, where the data is: fills gpu-carry/ (git-ignored)
#   bash benchmarks/gpu_check.sh        # on the GPU machine, with gpu-carry/ copied beside the repository's files
#   bash benchmarks/gpu_check.sh --only resume,speed    # rerun chosen steps
#   bash benchmarks/gpu_check.sh --dry-run              # on CPU, every size shrunk
#
# Writes $OUT/gpu_check.json (./gpu-report/ without $OUT), rewritten after every step, and
# gpu_check.log. Steps and options: benchmarks/gpu_check.py (--help);
# each step is a module of benchmarks/gpu_steps/.
set -u
cd "$(dirname "$0")/.." || exit 2
if [ -z "${PYTHON:-}" ]; then
    # the first interpreter that imports torch; none: the smoke step reports it
    for candidate in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" .venv/bin/python python3 python; do
        if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import torch' >/dev/null 2>&1; then
            PYTHON=$candidate
            break
        fi
    done
fi
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
