#!/usr/bin/env bash
# Type-check the package src/patchcore_edge/trt/ against the TensorRT stubs (tensorrt-stubs, fixed by
# prepare_stubs.py) and cuda-python.
# 1. every module of trt/ must pass mypy --strict;
# 2. a probe using an API removed in TensorRT 10 must FAIL, which proves the stubs are really read (without them
#    mypy would treat `tensorrt` as missing/Any and pass everything).
# Needs: mypy, tensorrt-stubs (pip install --no-deps tensorrt-stubs), numpy.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
stubs="${TRT_STUBS_DIR:-$root/build/typecheck-stubs}"
python="${PYTHON:-python}"

"$python" "$here/prepare_stubs.py" "$stubs" >/dev/null
export MYPYPATH="$stubs"
cd "$root"

echo "mypy (strict) on src/patchcore_edge/trt/ with TensorRT stubs from $stubs"
"$python" -m mypy --config-file "$here/mypy.ini" --no-incremental src/patchcore_edge/trt

probe_out="$("$python" -m mypy --config-file "$here/mypy.ini" --no-incremental "$here/probes/removed_api.py" 2>&1 || true)"
if grep -q 'has no attribute "max_workspace_size"' <<<"$probe_out"; then
    echo "probe ok: mypy rejects IBuilderConfig.max_workspace_size (removed in TensorRT 10), so the stubs are in use"
else
    echo "probe FAILED: mypy did not reject max_workspace_size; the TensorRT stubs are not being read:" >&2
    echo "$probe_out" >&2
    exit 1
fi
