"""The one compiled part: the cells' first pass (src/patchcore_edge/_native). Metadata lives in pyproject.toml.

The extension is optional: where it cannot be built (no C compiler), pip still installs the package and the search
runs the same first pass in numpy (search.py), slower (benchmarks/results/runtime_vs_anomalib.md, session 8)."""

import sys

from setuptools import Extension, setup

# fp-contract: the products are fused multiply-adds (ISO modes such as -std=c99 would turn that off).
flags = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=fast"]
setup(ext_modules=[Extension("patchcore_edge._cellscan", sources=["src/patchcore_edge/_native/cellscan.c"],
                             depends=["src/patchcore_edge/_native/cellscan_kernel.h"], extra_compile_args=flags,
                             optional=True)])
