#!/usr/bin/env bash
# From nothing to a heatmap: make .venv, install the pinned dependencies, build lxt_ext's
# C++ (and, where nvcc and a CUDA torch exist, CUDA) kernels, then attribute the embedded sample
# image with a random-weight VGG-16 and lxt_ext's EpsilonGammaBox (heatmap.png), and with a
# random-weight ViT-B/16 and lxt_ext's ViTGamma, LXT's published recipe (heatmap_vit.png).
# Offline apart from the package registry; with arguments, one run of `python -m lxt_ext` with
# them instead (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# LXT 2.1 (the tests' oracle for transformers) with its transformers 4.x, beside the venv
.venv/bin/python -m pip install -q --target .oracle --no-deps --upgrade -r requirements-oracle.txt
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
if [ $# -gt 0 ]; then
  .venv/bin/python -m lxt_ext "$@"
else
  .venv/bin/python -m lxt_ext --out heatmap.png
  .venv/bin/python -m lxt_ext --model vit_b_16 --out heatmap_vit.png
fi
