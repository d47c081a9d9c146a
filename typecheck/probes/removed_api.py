"""Must FAIL the type check: proves mypy really reads the TensorRT stubs (see typecheck/run.sh).

`max_workspace_size` was removed from IBuilderConfig in TensorRT 10; with the stubs on MYPYPATH mypy reports it.
"""

import tensorrt as trt


def old_style(config: trt.IBuilderConfig) -> None:
    config.max_workspace_size = 1 << 30
