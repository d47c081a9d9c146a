"""Each job takes one options dataclass that its command builds: run (RunOptions), calibrate
(CalibrationOptions), export (ExportOptions, from which the methods' MethodSettings is made by field name)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, List

import pytest
from click.testing import CliRunner

from patchcore_edge.calibration import calibrate as flow
from patchcore_edge.cli import calibrate as calibrate_cli
from patchcore_edge.cli import run as run_cli


def test_run_command_puts_every_option_into_run_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: List[run_cli.RunOptions] = []

    def fake_run(options: run_cli.RunOptions, handler: Any, fleet: Any) -> int:
        seen.append(options)
        return 0

    monkeypatch.setattr(run_cli, "_run", fake_run)
    args = [str(tmp_path), "a.png", "dir/", "-o", str(tmp_path / "out"), "--backend", "onnxruntime",
            "--batch-size", "3", "--no-maps", "--overlays", "--threads", "2", "--ef", "77", "--exact-search",
            "--max-frames", "9", "--jsonl", str(tmp_path / "r.jsonl"), "--no-recursive", "--map-range", "0.5", "2",
            "--reconnect-retries", "4", "--reconnect-delay", "1.5", "--read-ahead", "6", "--writer-threads", "0"]
    result = CliRunner().invoke(run_cli.run_command, args)
    assert result.exit_code == 0, result.output
    assert seen == [run_cli.RunOptions(
        bundle=tmp_path, inputs=("a.png", "dir/"), outdir=tmp_path / "out", backend="onnxruntime", batch_size=3,
        maps=False, overlays=True, threads=2, ef=77, exact_search=True, max_frames=9, jsonl=tmp_path / "r.jsonl",
        recursive=False, map_range=(0.5, 2.0), reconnect_retries=4, reconnect_delay=1.5, read_ahead=6,
        writer_threads=0)]
    # The dataclass's defaults are the command's.
    seen.clear()
    assert CliRunner().invoke(run_cli.run_command, [str(tmp_path), "a.png"]).exit_code == 0
    assert seen == [run_cli.RunOptions(bundle=tmp_path, inputs=("a.png",))]


def test_calibrate_command_puts_every_option_into_calibration_options(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    seen: List[flow.CalibrationOptions] = []

    class Stop(Exception):
        pass

    def fake_calibrate(detector: Any, bundle: Any, options: flow.CalibrationOptions, progress: Any) -> Any:
        seen.append(options)
        raise Stop

    monkeypatch.setattr(calibrate_cli.Bundle, "load", classmethod(lambda cls, *a, **k: None))
    monkeypatch.setattr(flow, "load_detector", lambda bundle, backend: object())
    monkeypatch.setattr(flow, "calibrate", fake_calibrate)
    good, bad, masks = (tmp_path / name for name in ("good", "bad", "masks"))
    args = [str(tmp_path / "bundle"), str(good), "--defects", str(bad), "--masks", str(masks),
            "--false-alarm-rate", "0.05", "--confidence", "0.9", "--optimise", "f1", "--min-defect-area", "12",
            "--batch-size", "7", "-q"]
    result = CliRunner().invoke(calibrate_cli.calibrate_command, args)
    assert isinstance(result.exception, Stop), result.output
    assert seen == [flow.CalibrationOptions(nominal_dir=good, defects_dir=bad, masks_dir=masks,
                                            false_alarm_rate=0.05, confidence=0.9, optimise="f1",
                                            min_defect_area=12, batch_size=7)]
    seen.clear()
    result = CliRunner().invoke(calibrate_cli.calibrate_command, [str(tmp_path / "bundle"), str(good), "-q"])
    assert isinstance(result.exception, Stop), result.output
    assert seen == [flow.CalibrationOptions(nominal_dir=good)]  # the dataclass's defaults are the command's


def test_method_settings_are_the_export_options_of_the_same_name(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from patchcore_edge.export.methods.base import MethodSettings
    from patchcore_edge.export.pipeline import _DERIVED_SETTINGS, ExportOptions, _settings
    from patchcore_edge.preprocess import InputSpec

    shared = [f.name for f in fields(MethodSettings) if f.name not in _DERIVED_SETTINGS]
    # Every shared field has the same default in both types, so a method tested with MethodSettings() sees
    # what an export with default options gives it.
    defaults = ExportOptions(nominal_dir=tmp_path, output=tmp_path / "b")
    assert {n: getattr(MethodSettings(), n) for n in shared} == {n: getattr(defaults, n) for n in shared}
    changed: Dict[str, Any] = dict(
        backbone="resnet18", weights="w.pth", feature_dim=7, coreset_ratio=0.3, coreset_size=11,
        projection_dim=5, device="cuda:1", seed=3, hnsw_m=12, ef_construction=50, ef=20, reweight_neighbours=4,
        rerank=2, reduction="per_stage", layers=("features.3", "features.6"), coreset_method="partitioned",
        device_profile="jetson-nano", dask="local")
    options = ExportOptions(nominal_dir=tmp_path, output=tmp_path / "b", crop=64, input_size=(96, 48),
                            **{k: v for k, v in changed.items() if k in shared})
    settings = _settings(options, InputSpec(crop=64, size=(96, 48)), {"k": 5})
    assert {n: getattr(settings, n) for n in shared} == {n: getattr(options, n) for n in shared}
    assert {n: getattr(settings, n) for n in changed if n in shared} == {
        n: v for n, v in changed.items() if n in shared}
    assert settings.crop == 96 and settings.method_params == {"k": 5}  # the derived ones
    pipeline_only = {"nominal_dir", "output", "force", "engine", "parity_images"}
    assert not pipeline_only & {f.name for f in fields(MethodSettings)}  # methods never see the pipeline's own
