"""Copy the installed `tensorrt-stubs` .pyi files into a folder for MYPYPATH, fixing the lines that do not parse.

Why: the stubs package ships no py.typed, so mypy ignores it where it is installed; it only reads the files from
a folder on MYPYPATH. A few generated lines are not valid Python or shadow builtins, and are fixed here:
- `import tensorrt_libs` (a package the stubs do not provide): removed;
- parameters named `in` (a keyword): renamed `in_`;
- `add_scale_nd(..., power: Weights = None, channel_axis: int)`: a parameter without default after defaulted
  ones; given the stub default `...`;
- the module-level `bool: DataType` (TensorRT's `trt.bool` data type) shadows the builtin in every `-> bool`
  annotation of the same file: those annotations are rewritten to `builtins.bool`;
- `typing_extensions.Buffer` is used without importing typing_extensions: the import is added.
Every fixed file must then parse (checked with `ast.parse`); an unknown new breakage stops the script with the
file and line, rather than leaving mypy to silently treat TensorRT as untyped.

Usage: python typecheck/prepare_stubs.py [OUT_DIR]   (default: build/typecheck-stubs, ignored by git)
"""

from __future__ import annotations

import ast
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, List, Tuple

PACKAGE = "tensorrt-stubs"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "build" / "typecheck-stubs"

Fix = Callable[[str], Tuple[str, int]]


def _drop_tensorrt_libs(text: str) -> Tuple[str, int]:
    return re.subn(r"^import tensorrt_libs as tensorrt_libs\n", "", text, flags=re.M)


def _rename_in_parameters(text: str) -> Tuple[str, int]:
    return re.subn(r"(?<=[(,] )in(?=: )|(?<=\()in(?=: )", "in_", text)


def _default_for_channel_axis(text: str) -> Tuple[str, int]:
    return re.subn(r"(power: Weights = None, channel_axis: int)\)", r"\1 = ...)", text)


def _builtin_bool_annotations(text: str) -> Tuple[str, int]:
    if not re.search(r"^bool: ", text, flags=re.M) or "def " not in text:
        return text, 0
    out: List[str] = []
    count = 0
    for line in text.split("\n"):
        if line.startswith("bool:") or line.startswith("__all__"):
            out.append(line)
            continue
        # Only bare `bool` names: not `trt.bool`, not quoted 'bool', not part of a longer word.
        new, n = re.subn(r"(?<![\w.'\"])bool(?![\w'\"])", "builtins.bool", line)
        out.append(new)
        count += n
    result = "\n".join(out)
    if count and not re.search(r"^import builtins$", result, flags=re.M):
        result = result.replace("from __future__ import annotations\n",
                                "from __future__ import annotations\nimport builtins\n", 1)
    return result, count


def _import_typing_extensions(text: str) -> Tuple[str, int]:
    if "typing_extensions." not in text or re.search(r"^import typing_extensions", text, flags=re.M):
        return text, 0
    return text.replace("from __future__ import annotations\n",
                        "from __future__ import annotations\nimport typing_extensions\n", 1), 1


FIXES: List[Tuple[str, Fix]] = [
    ("import tensorrt_libs", _drop_tensorrt_libs),
    ("parameters named `in`", _rename_in_parameters),
    ("add_scale_nd channel_axis default", _default_for_channel_axis),
    ("builtin bool shadowed by trt.bool", _builtin_bool_annotations),
    ("typing_extensions import", _import_typing_extensions),
]


def stub_files() -> List[Path]:
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        raise SystemExit(f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE}") from None
    files = [Path(str(dist.locate_file(f))) for f in (dist.files or []) if str(f).endswith(".pyi")]
    if not files:
        raise SystemExit(f"{PACKAGE} {dist.version} lists no .pyi files")
    return files


def prepare(out_dir: Path) -> List[str]:
    """Write the fixed stubs under out_dir; return one line per fix applied."""
    sources = stub_files()
    site = Path(str(metadata.distribution(PACKAGE).locate_file("")))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    report: List[str] = []
    for source in sources:
        relative = source.relative_to(site)
        text = source.read_text(encoding="utf-8")
        for label, fix in FIXES:
            text, count = fix(text)
            if count:
                report.append(f"{relative}: {label} ({count}x)")
        try:
            ast.parse(text, filename=str(relative))
        except SyntaxError as error:
            raise SystemExit(f"{relative}:{error.lineno}: still not valid Python after the known fixes "
                             f"({error.msg}); the stubs changed: add a fix to {Path(__file__).name}") from None
        target = out_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    return report


def main(argv: List[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else DEFAULT_OUT
    for line in prepare(out_dir):
        print(line)
    print(f"stubs of {PACKAGE} {metadata.version(PACKAGE)} written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
