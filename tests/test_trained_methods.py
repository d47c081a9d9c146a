"""Patch SVDD and multi-scale as registered methods: `export --method patch_svdd|multiscale` on a tiny schedule,
then run, calibrate, eval, devices fit and engine build through the CLI; resume from a checkpoint; refusal of
damaged bundles; runtime (ONNX Runtime + HNSW + re-rank through the bundle) against the torch reference on
real bottle images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from patchcore_edge.bundle import Bundle, BundleError, file_record, manifest_bytes  # noqa: E402
from patchcore_edge.cli import main  # noqa: E402
from patchcore_edge.export.methods import get_exporter  # noqa: E402
from patchcore_edge.export.methods.patch_reference import reference_scores  # noqa: E402
from patchcore_edge.export.methods.training import Schedule, TrainedOptions  # noqa: E402
from patchcore_edge.export.pipeline import ExportOptions, export_bundle  # noqa: E402
from patchcore_edge.export.transform import torch_preprocess  # noqa: E402
from patchcore_edge.imageio import read_rgb  # noqa: E402
from patchcore_edge.preprocess import preprocess  # noqa: E402
from patchcore_edge.runtime.detector import Detector  # noqa: E402

from conftest import elpv_images_dir  # noqa: E402

SIZE = 128  # the images' side, and the network input of Patch SVDD
# Multi-scale samples 64-pixel patches that do not overlap: it needs a larger input.
INPUT = {"patch_svdd": 128, "multiscale": 160}
# Two patches per loss and image: what these tests check does not depend on how many (the losses and the
# sampling have their own tests), and the encoders cost most of this file's time.
TINY = ["steps=2", "images_per_step=2", "patches_per_image=2", "max_bank=2000"]


def _images(target: Path, first: int, count: int, seed: int) -> Path:
    """Small real images (elpv cells) when installed, else synthetic textures."""
    import cv2

    target.mkdir(parents=True, exist_ok=True)
    source = elpv_images_dir()
    if source is not None:
        for path in sorted(source.glob("*.png"))[first:first + count]:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            cv2.imwrite(str(target / path.name), cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_AREA))
        return target
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = rng.normal(128, 20, (SIZE, SIZE, 3)) + 40 * np.sin(np.arange(SIZE) / 5.0)[None, :, None]
        cv2.imwrite(str(target / f"synthetic_{i:03d}.png"), np.clip(image, 0, 255).astype(np.uint8))
    return target


def _cli(*args: str) -> "CliRunner.invoke":
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _export_args(good: Path, out: Path, method: str, *params: str) -> List[str]:
    args = ["export", str(good), "-o", str(out), "--method", method, "--crop", str(INPUT[method]), "--no-engine",
            "-q"]
    for p in (*TINY, *params):
        args += ["--method-param", p]
    return args


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    root = tmp_path_factory.mktemp("trained")
    return {"good": _images(root / "good", 0, 6, 0), "fresh": _images(root / "fresh", 6, 10, 1),
            "bad": _images(root / "bad", 16, 3, 2), "root": root}


@pytest.fixture(scope="module", params=["patch_svdd", "multiscale"])
def exported(request: pytest.FixtureRequest, folders: Dict[str, Path]) -> Path:
    torch.set_num_threads(1)
    out = folders["root"] / f"bundle_{request.param}"
    result = _cli(*_export_args(folders["good"], out, request.param))
    assert result.exit_code == 0, result.output
    return out


def test_export_records_the_schedule_banks_and_the_map_geometry(exported: Path) -> None:
    bundle = Bundle.load(exported)
    params = bundle.method.params
    training = params["training"]
    assert training["steps_done"] == 2 and training["stopped_by"] == "steps" and training["images"] == 6
    assert training["schedule"]["patches_per_image"] == 2 and training["schedule"]["learning_rate"] == 1e-4
    assert set(training["final_losses"]) >= {"total"} and training["seconds"] > 0
    assert training["cpu_seconds"] > 0 and training["epochs"] == pytest.approx(2 * 2 / 6, abs=1e-3)
    assert training["patches_per_step"] == 4 and not training["abandoned_step"]
    names = [s["output"] for s in params["scales"]]
    assert list(bundle.features.outputs) == names
    side = INPUT[bundle.method.name]
    assert bundle.map_sigma == 0.0 and bundle.features.stride == 4 and bundle.features.grid == (side // 4,) * 2
    for scale in params["scales"]:
        h = (side - scale["kernel"]) // scale["stride"] + 1
        assert bundle.features.output_shape(scale["output"]) == (h, h, 64)
        bank = bundle.method_array(f"bank_{scale['output']}")
        assert bank.shape == (min(2000, 6 * h * h), 64) and bundle.has_file(f"index_{scale['output']}.hnsw")
    assert not any(name.endswith((".pt", ".pth", ".pkl")) for name in bundle.file_names)
    assert bundle.training_scores is not None and bundle.training_scores["n"] == 6


def test_run_calibrate_eval_and_devices_fit_through_the_cli(exported: Path, folders: Dict[str, Path]) -> None:
    jsonl = folders["root"] / f"run_{exported.name}.jsonl"
    maps = folders["root"] / f"maps_{exported.name}"
    run = _cli("run", str(exported), str(folders["bad"]), "--jsonl", str(jsonl), "-o", str(maps))
    assert run.exit_code == 0, run.output
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 3 and all(np.isfinite(r["score"]) and r["score"] > 0 for r in records)
    assert len(list(maps.rglob("*.heatmap.png"))) == 3
    calibrate = _cli("calibrate", str(exported), str(folders["fresh"]))
    assert calibrate.exit_code == 0, calibrate.output
    with Detector.load(exported) as detector:
        assert detector.calibration is not None
        result = detector.predict(str(next(folders["bad"].glob("*.png"))))
        assert result.normalised_score is not None and result.anomaly_map.shape == (SIZE, SIZE)
    evaluation = _cli("eval", str(exported), "--good", str(folders["fresh"]), "--bad", str(folders["bad"]))
    assert evaluation.exit_code == 0, evaluation.output
    assert "image AUROC" in evaluation.output and "trained 2 steps" in evaluation.output
    fit = _cli("devices", "fit", str(exported))
    assert fit.exit_code == 0, fit.output
    assert "bank_emb32" in fit.output and "index_emb32" in fit.output
    engine = CliRunner().invoke(main, ["engine", "build", str(exported)])
    assert engine.exit_code != 0 and "TensorRT" in engine.output and "Traceback" not in engine.output


def test_the_map_is_the_mean_over_covering_patches_without_smoothing(exported: Path, folders: Dict[str, Path]
                                                                     ) -> None:
    with Detector.load(exported, exact_search=True) as detector:
        image = read_rgb(next(folders["bad"].glob("*.png")))
        batch = np.stack([preprocess(image, detector.spec)])
        scored = detector.scorer.score(detector.backend.run(batch))[0]
        result = detector.predict(image)
    side = detector.spec.width
    assert scored.patch_map.shape == (side, side)
    cells = scored.patch_map.reshape(side // 4, 4, side // 4, 4)
    assert (cells == cells[:, :1, :, :1]).all()  # constant on 4-pixel cells: the covering-patch mean
    if side == SIZE:  # same size, sigma 0: the runtime leaves the map as it is
        np.testing.assert_allclose(result.anomaly_map, scored.patch_map, rtol=1e-6)
    assert result.score == pytest.approx(scored.score)


def _rewrite(bundle_dir: Path, edit) -> None:  # type: ignore[no-untyped-def]
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    edit(manifest)
    manifest["calibration"] = None  # its guard (another bundle's scores) would speak first
    for name in manifest["files"]:
        manifest["files"][name] = file_record(bundle_dir / name)
    (bundle_dir / "manifest.json").write_bytes(manifest_bytes(manifest))


def test_damaged_bundles_are_refused_with_the_reason(exported: Path, tmp_path: Path) -> None:
    first = json.loads((exported / "manifest.json").read_text())["method"]["params"]["scales"][0]["output"]
    wrong_dtype = tmp_path / "dtype"
    shutil.copytree(exported, wrong_dtype)
    np.save(wrong_dtype / f"bank_{first}.npy", np.load(exported / f"bank_{first}.npy").astype(np.float64))

    def as_float64(m: dict) -> None:
        m["method"]["arrays"][f"bank_{first}"]["dtype"] = "float64"
    _rewrite(wrong_dtype, as_float64)
    with pytest.raises(BundleError, match=f"bank_{first}.*float64"):
        Detector.load(wrong_dtype)

    fewer = tmp_path / "scales"
    shutil.copytree(exported, fewer)

    def drop_scale(m: dict) -> None:
        m["method"]["params"]["scales"] = m["method"]["params"]["scales"][1:]
    _rewrite(fewer, drop_scale)
    with pytest.raises(BundleError, match="scales"):
        Detector.load(fewer)

    shapes = tmp_path / "shapes"
    shutil.copytree(exported, shapes)

    def wrong_grid(m: dict) -> None:
        m["features"]["output_shapes"][first][0] += 1
    _rewrite(shapes, wrong_grid)
    with pytest.raises(BundleError, match=first):
        Detector.load(shapes)
    result = CliRunner().invoke(main, ["run", str(shapes), str(exported / "manifest.json")])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_unsupported_geometries_and_parameters_are_refused_before_training(folders: Dict[str, Path],
                                                                           tmp_path: Path) -> None:
    letterbox = CliRunner().invoke(main, _export_args(folders["good"], tmp_path / "a", "patch_svdd") +
                                   ["--fit", "letterbox"])
    assert letterbox.exit_code != 0 and "letterbox" in letterbox.output and "Traceback" not in letterbox.output
    odd = CliRunner().invoke(main, _export_args(folders["good"], tmp_path / "b", "multiscale") + ["--crop", "120"])
    assert odd.exit_code != 0 and "multiples of 16" in odd.output
    bad = CliRunner().invoke(main, _export_args(folders["good"], tmp_path / "c", "patch_svdd", "lambda=-1"))
    assert bad.exit_code != 0 and "lambda" in bad.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_stopped_training_resumes_from_its_checkpoint_through_the_cli(folders: Dict[str, Path],
                                                                        tmp_path: Path) -> None:
    checkpoint = tmp_path / "train.ckpt"
    first = _cli(*_export_args(folders["good"], tmp_path / "one", "patch_svdd", f"checkpoint={checkpoint}",
                               "checkpoint_every=1"))
    assert first.exit_code == 0, first.output
    resumed = _cli(*_export_args(folders["good"], tmp_path / "two", "patch_svdd", f"checkpoint={checkpoint}",
                                 "steps=3", "checkpoint_every=1"))
    assert resumed.exit_code == 0, resumed.output
    training = Bundle.load(tmp_path / "two").method.params["training"]
    assert training["resumed_from_step"] == 2 and training["steps_done"] == 3
    assert not any(name.endswith(".ckpt") for name in Bundle.load(tmp_path / "two").file_names)
    other = CliRunner().invoke(main, _export_args(folders["good"], tmp_path / "three", "patch_svdd",
                                                  f"checkpoint={checkpoint}", "lr=0.01"))
    assert other.exit_code != 0 and "checkpoint" in other.output and "another schedule" in other.output


@pytest.mark.parametrize("name", ["patch_svdd", "multiscale"])
def test_runtime_matches_torch_through_the_bundle_on_bottle(name: str, bottle: Path, tmp_path: Path) -> None:
    """The exported bundle, scored by the runtime (ONNX Runtime, HNSW + exact re-rank), against the torch
    reference (patch_reference.py: cdist over the bank, covering means by transposed convolution) run on the
    same seeded training, which must reproduce the bundle's encoder."""
    torch.set_num_threads(1)
    train = sorted((bottle / "train" / "good").glob("*.png"))[:5]  # an export needs 5
    tests = [sorted((bottle / "test" / "good").glob("*.png"))[0],
             sorted((bottle / "test" / "broken_large").glob("*.png"))[0]]
    options = ExportOptions(nominal_dir=bottle / "train" / "good", output=tmp_path / "bundle", method=name,
                            crop=INPUT[name], engine=False, method_params=TINY)
    export_bundle(options, images=train)
    with Detector.load(tmp_path / "bundle", ef=2) as detector:  # a poor index: the re-rank has work to do
        got = detector.predict_batch([str(p) for p in tests])
        spec = detector.spec
        banks = [detector.bundle.method_array(f"bank_{s.output}") for s in detector.scorer.layout.scales]
    # Maps are exact under exact search (or near a calibrated pixel threshold); elsewhere they hold HNSW's
    # distances, never below the exact ones.
    with Detector.load(tmp_path / "bundle", exact_search=True) as exact:
        runtime_batch = np.stack([preprocess(read_rgb(p), spec) for p in tests])
        maps = [s.patch_map for s in exact.scorer.score(exact.backend.run(runtime_batch))]
    method = get_exporter(name)
    images = np.stack([torch_preprocess(read_rgb(p), spec).numpy() for p in train])
    network, _ = method.train_network(images, TrainedOptions(schedule=Schedule(steps=2, images_per_step=2,
                                                                               patches_per_image=2)))
    batch = torch.from_numpy(np.stack([torch_preprocess(read_rgb(p), spec).numpy() for p in tests]))
    want_scores, want_maps = reference_scores(network, batch, banks, method.scales, method.combine, method.window)
    for result, got_map, want, want_map in zip(got, maps, want_scores, want_maps):
        np.testing.assert_allclose(result.score, want, rtol=1e-4)
        # A barely trained encoder's distances are near ties: float32 search may pick another row than the
        # float64 reference (see trained_parity.py), so the map is held to 0.5 % of its maximum.
        np.testing.assert_allclose(got_map, want_map, rtol=1e-4, atol=5e-3 * float(want_map.max()))
    assert got[1].score != got[0].score


def test_a_pixel_threshold_makes_the_map_exact_wherever_it_can_decide_a_mask(exported: Path,
                                                                             folders: Dict[str, Path]) -> None:
    from patchcore_edge.methods import ScorerOptions, scorer_class

    bundle = Bundle.load(exported)
    with Detector.load(exported, ignore_calibration=True) as detector:
        images = [read_rgb(p) for p in sorted(folders["bad"].glob("*.png"))]
        outputs = detector.backend.run(np.stack([preprocess(i, detector.spec) for i in images]))
    method = scorer_class(bundle.method.name)
    exact = method.load(bundle, ScorerOptions(exact_search=True)).score(outputs)
    loose = method.load(bundle, ScorerOptions(ef=1)).score(outputs)
    level = float(np.quantile(np.stack([e.patch_map for e in exact]), 0.9))
    guarded = method.load(bundle, ScorerOptions(ef=1, exact_map_above=level, exact_map_reach=2)).score(outputs)
    for e, lo, g in zip(exact, loose, guarded):
        assert (lo.patch_map >= e.patch_map - 1e-6).all()  # HNSW only over-estimates
        assert g.score == pytest.approx(e.score, rel=1e-6) and lo.score == pytest.approx(e.score, rel=1e-6)
        hot = e.patch_map > level
        np.testing.assert_allclose(g.patch_map[hot], e.patch_map[hot], rtol=1e-5)
        np.testing.assert_array_equal(g.patch_map > level, hot)
