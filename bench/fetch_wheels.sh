#!/usr/bin/env bash
# Download the wheels a GPU machine without a package index needs for bench/gpu_suite.sh and
# tests/train/test_cuda.py, into .whl/ (git-ignored); bring that folder along, and the suite
# installs them before it runs.
#
#   bash bench/fetch_wheels.sh            # the versions this environment has (PYTHON, default python3;
#                                         # PY_VERSION, default 3.12: the GPU machine's Python)
#   PACKAGES="monai==1.6.1" bash bench/fetch_wheels.sh
#
# Only what such images usually lack: monai is pure Python and needs nothing beyond torch and
# numpy, which every GPU image with PyTorch has. --no-deps keeps torch and numpy out of the
# folder (a second torch would be gigabytes and could replace the machine's CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=${WHEELS:-.whl}
if [ -z "${PACKAGES:-}" ]; then
    PACKAGES="monai==$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("monai"))')"
fi
mkdir -p "$DEST"
# shellcheck disable=SC2086  # PACKAGES is a list
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$DEST" $PACKAGES
ls -l "$DEST"
