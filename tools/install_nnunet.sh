#!/usr/bin/env bash
# nnU-Net v2 in a venv of its own (default .venv-nnunet), for bench/cpu_inference.py to set its
# predictor beside DuPLUS's. Kept apart from .venv: dynamic-network-architectures asks for timm,
# which would pull torchvision and a multi-GB CUDA torch over the CPU one. So torch goes in first,
# pinned, then nnU-Net's dependencies by name, then nnunetv2 and the network library without theirs
# (nnunetv2 never imports timm outside its primus trainers, which the predictor does not touch).
#   bash tools/install_nnunet.sh [VENV]      TORCH_SPEC, PIP_TORCH_ARGS and PYTHON as in the Makefile
set -euo pipefail
VENV=${1:-.venv-nnunet}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PIP_TORCH_ARGS=${PIP_TORCH_ARGS:-}
NNUNET_SPEC=${NNUNET_SPEC:-nnunetv2==2.8.1}
DNA_SPEC=${DNA_SPEC:-dynamic-network-architectures==0.4.4}

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
# shellcheck disable=SC2086  # PIP_TORCH_ARGS holds several words on purpose
"${PIP[@]}" $PIP_TORCH_ARGS "$TORCH_SPEC"
"${PIP[@]}" "$TORCH_SPEC" "acvl-utils>=0.2.6,<0.3" batchgenerators batchgeneratorsv2 blosc2 einops scipy \
    scikit-learn scikit-image SimpleITK pandas nibabel matplotlib seaborn imagecodecs yacs graphviz tifffile \
    requests tqdm psutil
"${PIP[@]}" --no-deps "$NNUNET_SPEC" "$DNA_SPEC"
"$VENV/bin/python" -c "import nnunetv2, dynamic_network_architectures, torch; print('nnU-Net', nnunetv2.__path__[0], 'torch', torch.__version__)"
