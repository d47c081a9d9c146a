"""`--method-param NAME=VALUE`: a method's own export options, parsed and checked before any work starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from patchcore_edge.cli import main
from patchcore_edge.export.methods import (FittedMethod, MethodExporter, MethodParameter, MethodSettings,
                                           NetworkInfo, get_exporter, method_params)
from patchcore_edge.preprocess import InputSpec


class _Example(MethodExporter):
    name = "example"
    parameters = (MethodParameter("k", int, 50, "neighbours", minimum=1),
                  MethodParameter("dtype", str, "float32", "gallery dtype", choices=("float32", "float16")),
                  MethodParameter("scale", float, 0.5, "a weight"),
                  MethodParameter("texture", bool, False, "texture category"))

    def network(self, settings: MethodSettings, spec: InputSpec,
                training_images: Sequence[np.ndarray]) -> Tuple[torch.nn.Module, NetworkInfo]:
        raise NotImplementedError

    def fit(self, outputs: Dict[str, np.ndarray], images: int, settings: MethodSettings, progress: Any,
            log: Any) -> FittedMethod:
        raise NotImplementedError


def test_defaults_and_parsed_values() -> None:
    assert method_params(_Example(), []) == {"k": 50, "dtype": "float32", "scale": 0.5, "texture": False}
    assert method_params(_Example(), ["k=3", "dtype = float16", "scale=2e-1", "texture=yes"]) == {
        "k": 3, "dtype": "float16", "scale": 0.2, "texture": True}


@pytest.mark.parametrize("pair, message", [
    ("k=0", "k must be an integer >= 1, got '0'"),
    ("k=2.5", "k must be an integer"),
    ("dtype=int8", "dtype must be one of float32, float16"),
    ("texture=maybe", "texture must be true or false"),
    ("kappa=1", "method 'example' takes dtype, k, scale, texture"),
    ("k", "expected NAME=VALUE"),
])
def test_bad_values_are_named(pair: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        method_params(_Example(), [pair])


def test_cli_refuses_an_unknown_parameter_before_any_work(tmp_path: Path) -> None:
    assert method_params(get_exporter("patchcore"), []) == {}
    nominal = tmp_path / "good"
    nominal.mkdir()
    result = CliRunner().invoke(main, ["export", str(nominal), "-o", str(tmp_path / "b"), "--method-param",
                                       "k=3", "-q"])
    assert result.exit_code != 0
    assert "method 'patchcore' takes no parameters" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("method, takes", [("spade", "gallery_dtype, k, kappa"), ("padim", "d, regularisation")])
def test_spade_and_padim_name_their_parameters(method: str, takes: str, tmp_path: Path) -> None:
    exporter = get_exporter(method)
    assert method_params(exporter, [])["k" if method == "spade" else "regularisation"] in (50, 0.01)
    nominal = tmp_path / "good"
    nominal.mkdir()
    result = CliRunner().invoke(main, ["export", str(nominal), "-o", str(tmp_path / "b"), "--method", method,
                                       "--method-param", "ef=3", "-q"])
    assert result.exit_code != 0 and f"method {method!r} takes {takes}" in result.output
    with pytest.raises(ValueError, match="gallery_dtype must be one of float32, float16"):
        method_params(get_exporter("spade"), ["gallery_dtype=int8"])


def test_padim_without_defaults_for_the_backbone_says_which_it_has(tmp_path: Path) -> None:
    from conftest import make_nominal_folder

    nominal = make_nominal_folder(tmp_path / "good", count=5, size=32)
    result = CliRunner().invoke(main, ["export", str(nominal), "-o", str(tmp_path / "b"), "--method", "padim",
                                       "--backbone", "efficientnet_lite0", "-q"])
    assert result.exit_code != 0 and "PaDiM has no default stages and d for efficientnet_lite0" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "b").exists()
