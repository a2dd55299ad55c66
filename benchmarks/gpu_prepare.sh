#!/usr/bin/env bash
# Prepares a GPU machine that has no network: run it where the data lies, then copy gpu-carry/
# (git-ignored) to the GPU machine together with the repository's files. It fills:
#
#   gpu-carry/site/mnist1d/         the mnist1d package (pure Python) from this environment; the GPU
#                                   machine has its other needs (numpy, scipy, matplotlib, requests)
#   gpu-carry/cifar10-jpeg.tar.gz   CIFAR-10, all 60,000 images as JPEGs (19 MB), from ../shared/data;
#                                   benchmarks/gpu_check.sh converts it there into the binary release that
#                                   `--data cifar10 --data-dir` reads (184 MB as records: too big to carry)
#
# No network. Prints the size of what is to be copied, and stops above 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
ARCHIVE=${CIFAR10_JPEG:-../shared/data/cifar10-jpeg.tar.gz}
SHA256=565b23c5c7308074240a1d9ebd0afd4c0fe42223a52214959e9589ec71b5f2f4   # ../shared/data/README.md

if [ ! -f "$ARCHIVE" ]; then
    echo "gpu_prepare: $ARCHIVE not found (set CIFAR10_JPEG=/path/to/cifar10-jpeg.tar.gz)" >&2
    exit 1
fi
if ! echo "$SHA256  $ARCHIVE" | sha256sum --check --status; then
    echo "gpu_prepare: $ARCHIVE does not have the sha256 that ../shared/data/README.md gives" >&2
    exit 1
fi
package=$("$PYTHON" -c 'import importlib.util as u; s = u.find_spec("mnist1d"); print(s.submodule_search_locations[0] if s else "")')
if [ -z "$package" ]; then
    echo "gpu_prepare: mnist1d is not installed in $PYTHON (pip install -e . installs it)" >&2
    exit 1
fi

rm -rf gpu-carry
mkdir -p gpu-carry/site
cp -R "$package" gpu-carry/site/mnist1d
find gpu-carry -name __pycache__ -prune -exec rm -rf {} +
cp "$ARCHIVE" gpu-carry/cifar10-jpeg.tar.gz

# what is to be copied: the tracked and untracked-not-ignored files, plus gpu-carry/
"$PYTHON" - <<'PY'
import os, subprocess
MiB = 1 << 20
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=True).stdout.decode().split("\0")
tree = sum(os.path.getsize(f) for f in files if f and os.path.isfile(f))


def size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


carry = {path: size(path) for path in ("gpu-carry/site", "gpu-carry/cifar10-jpeg.tar.gz")}
total = tree + sum(carry.values())
for name, size in carry.items():
    print(f"{name}: {size / MiB:.2f} MiB")
print(f"the project's files: {tree / MiB:.2f} MiB")
print(f"in all: {total / MiB:.1f} MiB to copy (kept under 64 MiB)")
if total > 64 * MiB:
    raise SystemExit("gpu_prepare: over the limit")
PY
echo 'next, on the GPU machine, with gpu-carry/ beside the files: bash benchmarks/gpu_check.sh   (about 5 minutes)'
