"""`run` never destroys an input, survives hostile images, a full disk and SIGTERM (issue 12)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from patchcore_edge.cli import main
from tests.test_imageio import _png_header_only


def _part(path: Path, value: int = 120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((80, 80, 3), value, np.uint8))
    return path


def _run(args: List[str]):
    return CliRunner().invoke(main, ["run", *args])


def test_jsonl_onto_an_input_is_refused_and_the_input_kept(tiny_bundle: Path, tmp_path: Path) -> None:
    part = _part(tmp_path / "part.png")
    before = part.read_bytes()
    result = _run([str(tiny_bundle), str(part), "--jsonl", str(part)])
    assert result.exit_code == 2 and "is one of the inputs" in result.output and "Traceback" not in result.output
    assert part.read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    result = _run([str(tiny_bundle), str(part), "--jsonl", str(notes)])
    assert result.exit_code == 2 and "not a JSON lines file" in result.output and notes.read_text() == "my notes\n"
    for where in (["--jsonl", str(tiny_bundle / "x.jsonl")], ["-o", str(tiny_bundle / "maps")],
                  ["-o", str(tmp_path / "maps")]):
        folder_input = [str(tmp_path)] if where[1].startswith(str(tmp_path / "maps")) else [str(part)]
        result = _run([str(tiny_bundle), *folder_input, *where])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert "inside" in result.output
    assert not (tiny_bundle / "x.jsonl").exists() and not (tiny_bundle / "maps").exists()


def test_map_range_infinity_is_an_option_error(tiny_bundle: Path, tmp_path: Path) -> None:
    part = _part(tmp_path / "part.png")
    result = _run([str(tiny_bundle), str(part), "--map-range", "0", "inf", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--map-range needs finite" in result.output and "Traceback" not in result.output


def test_hostile_images_never_stop_the_others(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    _part(folder / "a_good.png")
    (folder / "b_bomb.png").write_bytes(_png_header_only(40000, 40000))
    (folder / "c_line.png").write_bytes(_png_header_only(16000, 1, rows=1))
    (folder / "d_big.png").write_bytes(_png_header_only(30000, 30000))
    os.mkfifo(folder / "e_pipe.png")
    os.symlink(folder / "gone.png", folder / "f_link.png")
    _part(folder / "g_good.png")
    jsonl = tmp_path / "out.jsonl"
    started = time.perf_counter()
    result = _run([str(tiny_bundle), str(folder), "--jsonl", str(jsonl), "--no-maps"])
    assert time.perf_counter() - started < 60
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    scored = [Path(r["path"]).name for r in records if "score" in r]
    assert scored == ["a_good.png", "g_good.png"]
    errors = {Path(r["path"]).name: r["error"] for r in records if "error" in r}
    assert set(errors) == {"b_bomb.png", "c_line.png", "d_big.png"}
    assert "FIFO" in result.output and "dangling symbolic link" in result.output
    assert "skipped non-images 2" in result.output


def _run_limited(args: List[str], limit: int) -> subprocess.CompletedProcess:
    """patchcore-edge run in a child whose files may not grow past `limit` bytes: writes fail (EFBIG) like on
    a full disk (Python ignores SIGXFSZ, so the write returns the error instead of killing the process)."""

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", "from patchcore_edge.cli import main; main()", "run", *args], capture_output=True,
                          text=True, timeout=120, preexec_fn=limit_files, env=env)


@pytest.mark.parametrize("writers", ["0", "1"])
def test_full_disk_loses_nothing_and_says_so(tiny_bundle: Path, tmp_path: Path, writers: str) -> None:
    folder = tmp_path / "in"
    for i in range(6):
        # the first images are small (flat), the last one noisy: its heat map PNG cannot be written in full
        _part(folder / f"p{i}.png", 40 * i)
    noisy = np.random.default_rng(0).integers(0, 255, (1200, 1200, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / "p9.png"), noisy)
    out, jsonl = tmp_path / "out", tmp_path / "r.jsonl"
    done = _run_limited([str(tiny_bundle), str(folder), "-o", str(out), "--jsonl", str(jsonl),
                         "--writer-threads", writers], limit=40_000)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2 and "cannot write" in done.stderr and "File too large" in done.stderr
    lines = jsonl.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    assert records
    for record in records:
        for path in record.get("outputs", {}).values():
            assert Path(path).is_file(), f"{path} listed but not written"
    failed = [r for r in records if "output_error" in r]
    assert failed and failed[0]["path"].endswith("p9.png") and "outputs" not in failed[0]


def test_jsonl_on_a_full_disk_keeps_whole_lines(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    for i in range(40):
        _part(folder / f"p{i:02d}.png", i)
    jsonl = tmp_path / "r.jsonl"
    done = _run_limited([str(tiny_bundle), str(folder), "--jsonl", str(jsonl), "--no-maps"], limit=3000)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot write {jsonl}" in done.stderr
    lines = jsonl.read_text().splitlines()
    assert lines and all(json.loads(line)["score"] is not None for line in lines)
    assert jsonl.stat().st_size <= 3000


def test_sigterm_ends_a_run_with_the_summary(tiny_bundle: Path, tmp_path: Path) -> None:
    video = tmp_path / "long.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 64))
    for i in range(3000):
        writer.write(np.full((64, 64, 3), i % 255, np.uint8))
    writer.release()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", "from patchcore_edge.cli import main; main()", "run", str(tiny_bundle), str(video),
                              "--no-maps", "--jsonl", str(tmp_path / "r.jsonl")], stderr=subprocess.PIPE,
                             text=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not ((tmp_path / "r.jsonl").exists()
                                          and (tmp_path / "r.jsonl").stat().st_size > 0):
        time.sleep(0.1)
    child.send_signal(signal.SIGTERM)
    sent = time.perf_counter()
    _, err = child.communicate(timeout=30)
    assert time.perf_counter() - sent < 3.0
    assert child.returncode == 130 and "run summary (interrupted)" in err and "Traceback" not in err


def test_a_fifo_named_on_the_command_line_is_refused_without_blocking(tiny_bundle: Path, tmp_path: Path) -> None:
    pipe = tmp_path / "camera.png"
    os.mkfifo(pipe)
    good = _part(tmp_path / "good.png")
    started = time.perf_counter()
    result = _run([str(tiny_bundle), str(pipe), str(good), "--no-maps"])
    assert time.perf_counter() - started < 60
    assert result.exit_code == 1 and "FIFO" in result.output and "Traceback" not in result.output
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [("score" in r) for r in records] == [False, True]
