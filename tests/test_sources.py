"""Input resolution for `patchcore-edge run`: files, folders, globs, videos (real OpenCV), live sources.

The live-source tests use `FakeCamera`, a declared test double for a camera (no camera exists on a CI
machine): it implements the three cv2.VideoCapture methods the sources call and fails on a script, so the
reconnect back-off can be checked without real waiting. Everything else runs the real code on real files.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import List, Optional, Tuple

import cv2
import numpy as np
import pytest

from patchcore_edge.imageio import ImageReadError
from patchcore_edge.runtime.sources import (CaptureTarget, ReconnectPolicy, classify, iter_frames,
                                            opencv_has_gstreamer, plan_inputs, read_ahead, redact_url)


def write_png(path: Path, value: int, size: Tuple[int, int] = (24, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.full((size[0], size[1], 3), value, dtype=np.uint8)
    image[0, 0] = (value // 2, 255 - value, 7)
    assert cv2.imwrite(str(path), image)
    return path


def frames_of(arguments: List[str], **options: object) -> List[Tuple[str, str, int, object]]:
    plan = plan_inputs(arguments, **options)  # type: ignore[arg-type]
    return [(frame.key, frame.name, frame.index, value) for frame, value in iter_frames(plan)]


def write_video(path: Path, colours_bgr: List[Tuple[int, int, int]],
                size: Tuple[int, int] = (64, 48)) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, size)
    assert writer.isOpened(), "this OpenCV cannot write MJPG .avi"
    for colour in colours_bgr:
        writer.write(np.full((size[1], size[0], 3), colour, dtype=np.uint8))
    writer.release()


def test_classify_each_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = write_png(tmp_path / "a.png", 10)
    video = tmp_path / "clip.MP4"
    video.write_bytes(b"x")
    assert classify(str(tmp_path)) == "folder"
    assert classify(str(image)) == "image"
    assert classify(str(video)) == "video"
    assert classify("0") == "camera" and classify("12") == "camera"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "0").write_bytes(image.read_bytes())
    assert classify("0") == "image"  # an existing file wins over the camera reading
    assert classify("videotestsrc ! videoconvert ! appsink") == "gstreamer"
    assert classify("rtsp://cam.local/stream") == "url"
    assert classify(str(tmp_path / "*.png")) == "glob"
    assert classify(str(tmp_path / "nothing.png")) == "missing"


def test_folder_is_sorted_recursive_and_mirrors_structure(tmp_path: Path) -> None:
    root = tmp_path / "test"
    write_png(root / "good" / "001.png", 20)
    write_png(root / "good" / "000.png", 10)
    write_png(root / "crack" / "000.png", 30)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored")
    plan = plan_inputs([str(root)])
    items = [(frame.name, frame.index, value) for frame, value in iter_frames(plan)]
    assert [name for name, _, _ in items] == ["test/crack/000", "test/good/000", "test/good/001"]
    assert [index for _, index, _ in items] == [0, 1, 2]
    assert int(items[1][2][5, 5, 0]) == 10  # type: ignore[index]
    assert [Path(error.path).name for error in plan.skipped] == ["notes.txt"]
    assert plan.total == 3 and not plan.has_streams

    flat = plan_inputs([str(root)], recursive=False)
    assert flat.total == 0


def test_unreadable_image_becomes_an_error_item_and_the_run_goes_on(tmp_path: Path) -> None:
    write_png(tmp_path / "in" / "a.png", 10)
    (tmp_path / "in" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    write_png(tmp_path / "in" / "c.png", 30)
    items = frames_of([str(tmp_path / "in")])
    assert [Path(key).name for key, _, _, _ in items] == ["a.png", "b.png", "c.png"]
    error = items[1][3]
    assert isinstance(error, ImageReadError)
    assert error.path.endswith("b.png") and "not a readable image" in error.reason
    assert isinstance(items[0][3], np.ndarray) and isinstance(items[2][3], np.ndarray)


def test_rgb_channel_order_from_files(tmp_path: Path) -> None:
    path = tmp_path / "blue.png"
    cv2.imwrite(str(path), np.full((8, 8, 3), (255, 0, 0), dtype=np.uint8))  # BGR blue
    (_, _, _, image), = frames_of([str(path)])
    assert tuple(image[0, 0]) == (0, 0, 255)  # type: ignore[index]


def test_output_names_never_collide(tmp_path: Path) -> None:
    write_png(tmp_path / "a" / "good" / "000.png", 1)
    write_png(tmp_path / "b" / "good" / "000.png", 2)
    write_png(tmp_path / "c" / "Part.png", 3)
    write_png(tmp_path / "d" / "part.png", 4)
    write_png(tmp_path / "e" / "x.png", 5)
    write_png(tmp_path / "e" / "x.jpg", 6)
    items = frames_of([str(tmp_path / "a" / "good"), str(tmp_path / "b" / "good"),
                       str(tmp_path / "c" / "Part.png"), str(tmp_path / "d" / "part.png"),
                       str(tmp_path / "e")])
    names = [name for _, name, _, _ in items]
    assert names == ["good/000", "good~2/000", "Part", "part~2", "e/x", "e/x~2"]
    assert len({name.casefold() for name in names}) == len(names)


def test_glob_names_are_relative_to_its_fixed_folders(tmp_path: Path) -> None:
    write_png(tmp_path / "data" / "good" / "000.png", 1)
    write_png(tmp_path / "data" / "bad" / "000.png", 2)
    (tmp_path / "data" / "bad" / "000.txt").write_text("x")
    items = frames_of([str(tmp_path / "data" / "*" / "0*.*")])
    assert [name for _, name, _, _ in items] == ["bad/000", "good/000"]
    assert all(isinstance(value, np.ndarray) for _, _, _, value in items)


def test_missing_path_and_empty_glob_are_error_items(tmp_path: Path) -> None:
    write_png(tmp_path / "ok.png", 1)
    items = frames_of([str(tmp_path / "absent.png"), str(tmp_path / "*.jpg"), str(tmp_path / "ok.png")])
    assert isinstance(items[0][3], ImageReadError) and "no such file or folder" in items[0][3].reason
    assert isinstance(items[1][3], ImageReadError) and "no image file matches" in items[1][3].reason
    assert isinstance(items[2][3], np.ndarray)
    assert [index for _, _, index, _ in items] == [0, 1, 2]


def test_video_frames_are_keyed_numbered_and_rgb(tmp_path: Path) -> None:
    video = tmp_path / "line.avi"
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (40, 40, 40), (200, 200, 200)]  # BGR
    write_video(video, colours)
    items = frames_of([str(video)])
    assert [key for key, _, _, _ in items] == [f"{video}#frame={n:06d}" for n in range(5)]
    assert [name for _, name, _, _ in items] == [f"line/frame_{n:06d}" for n in range(5)]
    for (_, _, _, image), (b, g, r) in zip(items, colours):
        assert isinstance(image, np.ndarray) and image.shape == (48, 64, 3)
        assert np.abs(image[24, 32].astype(int) - (r, g, b)).max() < 25  # MJPG is lossy; order must be RGB

    limited = frames_of([str(video)], max_frames=2)
    assert len(limited) == 2


def test_broken_video_is_one_error_item(tmp_path: Path) -> None:
    video = tmp_path / "broken.mp4"
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    write_png(tmp_path / "after.png", 9)
    items = frames_of([str(video), str(tmp_path / "after.png")])
    assert isinstance(items[0][3], ImageReadError) and items[0][3].path == str(video)
    assert isinstance(items[1][3], np.ndarray)


def test_stream_folders_avoid_file_names(tmp_path: Path) -> None:
    write_video(tmp_path / "v.avi", [(1, 2, 3)])
    write_png(tmp_path / "imgs" / "v" / "frame_000000.png", 5)
    # The glob gives the file the name v/frame_000000, so the video's frames must go elsewhere.
    items = frames_of([str(tmp_path / "v.avi"), str(tmp_path / "imgs" / "*" / "*.png")])
    names = [name for _, name, _, _ in items]
    assert names == ["v~2/frame_000000", "v/frame_000000"]


class FakeCamera:
    """Test double of cv2.VideoCapture for a camera that opens or fails following a shared script."""

    def __init__(self, script: "CameraScript", target: CaptureTarget) -> None:
        self.script = script
        self.target = target
        self.opened = script.opens.pop(0) if script.opens else False
        self.frames = script.frames_per_open.pop(0) if self.opened and script.frames_per_open else 0
        script.instances.append(self)
        self.released = False

    def isOpened(self) -> bool:  # noqa: N802
        return self.opened

    def read(self) -> Tuple[bool, Optional[np.ndarray]]:
        if not self.opened or self.frames == 0:
            return False, None
        self.frames -= 1
        self.script.delivered += 1
        return True, np.full((6, 8, 3), self.script.delivered % 256, dtype=np.uint8)

    def release(self) -> None:
        self.released = True


class CameraScript:
    def __init__(self, opens: List[bool], frames_per_open: List[int]) -> None:
        self.opens = opens
        self.frames_per_open = frames_per_open
        self.instances: List[FakeCamera] = []
        self.delivered = 0
        self.sleeps: List[float] = []

    def factory(self, target: CaptureTarget) -> FakeCamera:
        return FakeCamera(self, target)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)


def test_camera_reconnects_with_exponential_backoff_then_gives_up(caplog: pytest.LogCaptureFixture) -> None:
    # open fails twice, then 3 frames, drop-out, open fails until the retries are spent.
    script = CameraScript(opens=[False, False, True] + [False] * 10, frames_per_open=[3])
    policy = ReconnectPolicy(max_retries=4, initial_delay=0.5, factor=2.0, max_delay=3.0)
    with caplog.at_level("WARNING"):
        items = frames_of(["0"], policy=policy, factory=script.factory, sleep=script.sleep)
    frames = [(key, value) for key, _, _, value in items if isinstance(value, np.ndarray)]
    assert [key for key, _ in frames] == [f"camera0#frame={n:06d}" for n in range(3)]
    # Two failures before the first frame, then the count restarts: 4 more until it gives up.
    assert script.sleeps == [0.5, 1.0, 0.5, 1.0, 2.0, 3.0]
    last = items[-1][3]
    assert isinstance(last, ImageReadError) and "gave up after 4 reconnect attempts" in last.reason
    assert "3 frames read" in last.reason
    assert all(camera.released for camera in script.instances)
    assert all(camera.target == CaptureTarget("camera", "0") for camera in script.instances)
    assert sum("reconnecting in" in record.getMessage() for record in caplog.records) == 6


def test_camera_frame_numbers_continue_across_reconnects() -> None:
    script = CameraScript(opens=[True, True], frames_per_open=[2, 2])
    items = frames_of(["1"], policy=ReconnectPolicy(max_retries=1, initial_delay=0.0), factory=script.factory,
                      sleep=script.sleep, max_frames=4)
    assert [key for key, _, _, _ in items] == [f"camera1#frame={n:06d}" for n in range(4)]
    assert [name for _, name, _, _ in items] == [f"camera1/frame_{n:06d}" for n in range(4)]
    assert script.sleeps == [0.0]


def test_no_retries_fails_at_once() -> None:
    script = CameraScript(opens=[False], frames_per_open=[])
    policy = ReconnectPolicy(max_retries=0)
    items = frames_of(["0"], policy=policy, factory=script.factory, sleep=script.sleep)
    assert len(items) == 1 and isinstance(items[0][3], ImageReadError)
    assert script.sleeps == []


def test_gstreamer_pipeline_is_passed_whole() -> None:
    pipeline = ("nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1280,height=720 ! nvvidconv ! "
                "video/x-raw,format=BGRx ! videoconvert ! appsink drop=1 max-buffers=2")
    script = CameraScript(opens=[True], frames_per_open=[2])
    items = frames_of([pipeline], factory=script.factory, sleep=script.sleep, max_frames=2)
    assert script.instances[0].target == CaptureTarget("gstreamer", pipeline)
    assert [key for key, _, _, _ in items] == ["gstreamer#frame=000000", "gstreamer#frame=000001"]


@pytest.mark.skipif(opencv_has_gstreamer(), reason="this OpenCV has GStreamer")
def test_gstreamer_without_support_says_what_to_do() -> None:
    items = frames_of(["videotestsrc ! videoconvert ! appsink"])
    assert len(items) == 1
    error = items[0][3]
    assert isinstance(error, ImageReadError) and "no GStreamer support" in error.reason


def test_url_passwords_are_redacted() -> None:
    assert redact_url("rtsp://admin:s3cret@10.0.0.2:554/live") == "rtsp://admin:***@10.0.0.2:554/live"
    assert redact_url("rtsp://10.0.0.2/live") == "rtsp://10.0.0.2/live"
    script = CameraScript(opens=[True], frames_per_open=[1])
    items = frames_of(["rtsp://admin:s3cret@cam/x"], factory=script.factory, sleep=script.sleep, max_frames=1)
    assert items[0][0] == "rtsp://admin:***@cam/x#frame=000000"
    assert script.instances[0].target.spec == "rtsp://admin:s3cret@cam/x"


def test_read_ahead_keeps_order_and_raises_producer_errors() -> None:
    assert list(read_ahead(iter(range(50)), depth=3)) == list(range(50))
    assert list(read_ahead(iter(range(5)), depth=0)) == list(range(5))

    def failing():  # type: ignore[no-untyped-def]
        yield 1
        raise ImageReadError("x.png", "boom")

    consumer = read_ahead(failing(), depth=2)
    assert next(consumer) == 1
    with pytest.raises(ImageReadError, match="boom"):
        next(consumer)


def test_read_ahead_is_bounded_and_stops_when_closed() -> None:
    produced: List[int] = []
    gate = threading.Event()

    def source():  # type: ignore[no-untyped-def]
        for value in range(1000):
            produced.append(value)
            yield value

    consumer = read_ahead(source(), depth=4)
    assert next(consumer) == 0
    gate.wait(0.3)
    # one consumed, 4 queued, one more blocked in put: never the whole input.
    assert len(produced) <= 6
    consumer.close()
    count = len(produced)
    gate.wait(0.3)
    assert len(produced) == count


def test_glob_with_dotdot_keeps_output_names_inside_the_output_folder(tmp_path: Path) -> None:
    import cv2

    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    assert cv2.imwrite(str(tmp_path / "x" / "p.png"), np.zeros((4, 4, 3), np.uint8))
    plan = plan_inputs([str(tmp_path / "in" / "*" / ".." / ".." / "x" / "*.png")])
    names = [key.name for key, _ in iter_frames(plan)]
    assert names and all(".." not in name.split("/") for name in names)
    out = tmp_path / "out"
    assert all((out / name).resolve().is_relative_to(out.resolve()) for name in names)
