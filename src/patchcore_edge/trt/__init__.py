"""TensorRT engines for the patch-feature network: build, check, load and run.

The only package of patchcore-edge that imports `tensorrt` and `cuda` (cuda-python), both inside functions, so
importing it never fails where they are missing; `tensorrt_status()` says why TensorRT cannot be used here.
It knows nothing of boards (that is `devices/`) and imports nothing above it. One module per job, as NVIDIA
Polygraphy splits its TensorRT backend:

    status      is TensorRT importable and new enough (8.5 .. 10.x), versions, one-line status
    cuda        CUDA device memory, streams and device properties through cuda-python
    callbacks   the logger; callbacks hold their errors until TensorRT returns, never raise into it
    calibrator  the INT8 entropy calibrator over preprocessed nominal images
    build       ONNX parsing, optimisation profiles, precision and DLA checks, workspace pool
    engines     engine file names, manifest entries, matching an engine to a device
    runner      TensorRTFeatures: load an engine and run it ({output name: array} for every output; name-based
                I/O, execute_async_v3)
    verify      the one engine check against ONNX Runtime (every output, then image scores)
"""

from .build import INPUT_NAME, PRECISIONS, BuildResult, build_engine, optimisation_profiles
from .cuda import CudaDevice, cuda_devices
from .engines import (DeviceLike, cache_files, dla_core_of, engine_entry, engine_entry_matches, engine_file_name,
                      entry_files, same_slot, select_engine, write_engine_files)
from .errors import REBUILD_HINT, CudaError, EngineBuildError, EngineLoadError, TensorRTUnavailable
from .runner import OutputTensor, TensorIO, TensorRTFeatures
from .status import (MIN_TENSORRT, ensure_tensorrt, format_compute_capability, parse_version, tensorrt_status,
                     tensorrt_version)
from .verify import (FEATURE_TOLERANCE, SCORE_TOLERANCE, EngineScoreError, check_features, check_scores,
                     feature_errors, measure_against_onnxruntime, onnx_io, output_errors, verify_engine)

__all__ = [
    "BuildResult", "CudaDevice", "CudaError", "DeviceLike", "EngineBuildError", "EngineLoadError",
    "EngineScoreError", "FEATURE_TOLERANCE", "INPUT_NAME", "MIN_TENSORRT", "OutputTensor", "PRECISIONS", "REBUILD_HINT",
    "SCORE_TOLERANCE", "TensorIO", "TensorRTFeatures", "TensorRTUnavailable", "build_engine", "cache_files",
    "check_features", "check_scores", "cuda_devices", "dla_core_of", "engine_entry", "engine_entry_matches",
    "engine_file_name", "ensure_tensorrt", "entry_files", "feature_errors", "format_compute_capability",
    "measure_against_onnxruntime", "onnx_io", "optimisation_profiles", "output_errors", "parse_version", "same_slot",
    "select_engine", "tensorrt_status", "tensorrt_version", "verify_engine", "write_engine_files",
]
