"""Turn the `run` command's INPUT arguments into frames: files, folders, globs, video files, cameras,
GStreamer pipelines and network streams.

Every frame comes out as `(FrameKey, image)` where image is an RGB uint8 array, or an `ImageReadError` when
the input could not be read: one bad file never stops a run. Output names (`FrameKey.name`) are decided here,
once, for the whole run, so that two inputs never write to the same output file:

* a single file: its stem (`parts/a.png` -> `a`);
* a folder: the folder's name, then the path inside it (`data/test/` -> `test/broken_large/000`), subfolders
  included when `recursive`;
* a glob: the path relative to the glob's fixed leading folders (`data/*/0*.png` -> `good/000`);
* a video, camera, GStreamer pipeline or URL: a folder of numbered frames (`line.mp4` -> `line/frame_000123`,
  camera 0 -> `camera0/frame_000123`).

Names are compared case-insensitively (outputs may land on a case-insensitive file system); a name already
taken gets `~2`, `~3`, ... appended, in input order.

Live sources (cameras, GStreamer, URLs) that fail to open or stop delivering frames are reopened with
exponential back-off (`ReconnectPolicy`); each attempt is logged, and after `max_retries` failed attempts in a
row the source ends with one error item. `sleep` is injectable so the back-off is testable without waiting.
"""

from __future__ import annotations

import glob as globmod
import logging
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import (Callable, Generator, Iterable, Iterator, List, Optional, Protocol, Sequence, Set, Tuple,
                    TypeVar, Union)

import cv2
import numpy as np

from patchcore_edge.imageio import IMAGE_SUFFIXES, ImageReadError, list_images, read_rgb, skip_reason, to_rgb8

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv", ".flv",
                            ".ts", ".mts", ".m2ts", ".3gp", ".mjpeg", ".mjpg", ".h264", ".h265", ".hevc"})
_GLOB_CHARS = re.compile(r"[*?\[]")
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_URL_PASSWORD = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://[^/@:]*):[^/@]*@")

Image = np.ndarray
ItemValue = Union[np.ndarray, ImageReadError]


@dataclass(frozen=True)
class FrameKey:
    """Identifies one frame of a run.

    key: what a user reads in the results -- the path as given, or `line.mp4#frame=000123` for a video frame.
    name: unique output name relative to the output folder, POSIX separators, no suffix.
    index: position in the run, counting from 0 (error items included).
    """

    key: str
    name: str
    index: int


Item = Tuple[FrameKey, ItemValue]


@dataclass(frozen=True)
class ReconnectPolicy:
    """Exponential back-off for live sources: wait initial_delay, then factor times longer after each failed
    attempt (at most max_delay); give up after max_retries failed attempts in a row. A frame resets the
    count of failed attempts."""

    max_retries: int = 10
    initial_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.initial_delay < 0 or self.factor < 1.0 or self.max_delay < 0:
            raise ValueError("reconnect policy needs max_retries >= 0, delays >= 0 and factor >= 1")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnect attempt number `attempt` (1-based)."""
        return float(min(self.initial_delay * self.factor ** (attempt - 1), self.max_delay))


class Capture(Protocol):
    """The part of cv2.VideoCapture the sources use (a fake camera in tests implements the same)."""

    def isOpened(self) -> bool: ...  # noqa: N802 -- OpenCV's spelling

    def read(self) -> Tuple[bool, Optional[np.ndarray]]: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class CaptureTarget:
    """What to open: kind is "video" (a file), "camera" (an index), "gstreamer" (a pipeline) or "url"."""

    kind: str
    spec: str


CaptureFactory = Callable[[CaptureTarget], Capture]


def opencv_has_gstreamer() -> bool:
    """Whether this OpenCV build can open GStreamer pipelines (pip's opencv-python wheels cannot)."""
    match = re.search(r"GStreamer:\s*(\S+)", cv2.getBuildInformation())
    return match is not None and match.group(1).upper() != "NO"


def open_capture(target: CaptureTarget) -> Capture:
    """Open a target with OpenCV: files and URLs by name, cameras by index, pipelines with CAP_GSTREAMER."""
    if target.kind == "camera":
        return cv2.VideoCapture(int(target.spec))
    if target.kind == "gstreamer":
        return cv2.VideoCapture(target.spec, cv2.CAP_GSTREAMER)
    return cv2.VideoCapture(target.spec)


def redact_url(url: str) -> str:
    """`rtsp://user:secret@host/x` -> `rtsp://user:***@host/x`: keys and logs must not carry passwords."""
    return _URL_PASSWORD.sub(r"\1:***@", url)


def _frame_tag(number: int) -> str:
    return f"{number:06d}"


class Source:
    """A resolved INPUT argument; `count`: the number of items when known in advance (files), else None."""

    label: str = ""
    count: Optional[int] = None

    def items(self) -> Iterator[Tuple[str, str, ItemValue]]:
        """(key, output name, image or error) for each frame, in order."""
        raise NotImplementedError


class FileSource(Source):
    """Image files known in advance: single files, folder contents, glob matches.

    Entries are (key, name, path) or (key, name, error) for inputs already known to be bad (missing path, a
    glob that matches nothing), so that they are reported in input order with the rest.
    """

    def __init__(self, label: str, entries: Sequence[Tuple[str, str, Union[Path, ImageReadError]]]) -> None:
        self.label = label
        self.entries = list(entries)
        self.count = len(self.entries)

    def items(self) -> Iterator[Tuple[str, str, ItemValue]]:
        for key, name, target in self.entries:
            if isinstance(target, ImageReadError):
                yield key, name, target
                continue
            try:
                yield key, name, read_rgb(target)
            except ImageReadError as error:
                yield key, name, ImageReadError(key, error.reason)


class VideoFileSource(Source):
    """Frames of a video file, read once from start to end (no reconnecting: the end of a file is the end)."""

    def __init__(self, path: str, root: str, max_frames: Optional[int], factory: CaptureFactory) -> None:
        self.label = path
        self.path = path
        self.root = root
        self.max_frames = max_frames
        self.factory = factory

    def items(self) -> Iterator[Tuple[str, str, ItemValue]]:
        capture = self.factory(CaptureTarget("video", self.path))
        try:
            if not capture.isOpened():
                yield self.path, self.root, ImageReadError(
                    self.path, "cannot open video (unsupported container or codec for this OpenCV build, "
                               "or a corrupt file)")
                return
            number = 0
            while self.max_frames is None or number < self.max_frames:
                ok, frame = capture.read()
                if not ok or frame is None:
                    break
                tag = _frame_tag(number)
                key = f"{self.path}#frame={tag}"
                yield key, f"{self.root}/frame_{tag}", _convert(frame, key)
                number += 1
            if number == 0:
                yield self.path, self.root, ImageReadError(self.path, "video has no readable frames")
        finally:
            capture.release()


class LiveSource(Source):
    """A camera, GStreamer pipeline or network stream: read until max_frames, reconnecting on drop-outs."""

    def __init__(self, target: CaptureTarget, label: str, root: str, max_frames: Optional[int],
                 policy: ReconnectPolicy, factory: CaptureFactory,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.target = target
        self.label = label
        self.root = root
        self.max_frames = max_frames
        self.policy = policy
        self.factory = factory
        self.sleep = sleep

    def _open(self) -> Optional[Capture]:
        try:
            capture = self.factory(self.target)
        except (cv2.error, OSError, ValueError) as error:
            log.warning("%s: cannot open (%s)", self.label, error)
            return None
        if capture.isOpened():
            return capture
        capture.release()
        return None

    def items(self) -> Iterator[Tuple[str, str, ItemValue]]:
        number = 0
        failures = 0
        problem = "cannot open it"
        capture: Optional[Capture] = None
        try:
            while self.max_frames is None or number < self.max_frames:
                if capture is None:
                    capture = self._open()
                    problem = "cannot open it"
                if capture is not None:
                    ok, frame = capture.read()
                    if ok and frame is not None:
                        failures = 0
                        tag = _frame_tag(number)
                        key = f"{self.label}#frame={tag}"
                        yield key, f"{self.root}/frame_{tag}", _convert(frame, key)
                        number += 1
                        continue
                    problem = "it stopped delivering frames"
                    capture.release()
                    capture = None
                if failures >= self.policy.max_retries:
                    reason = (f"live source lost: {problem}, gave up after {failures} reconnect attempts "
                              f"({number} frames read)")
                    log.error("%s: %s", self.label, reason)
                    yield self.label, self.root, ImageReadError(self.label, reason)
                    return
                failures += 1
                delay = self.policy.delay(failures)
                log.warning("%s: %s; reconnecting in %.1f s (attempt %d of %d)", self.label, problem, delay,
                            failures, self.policy.max_retries)
                self.sleep(delay)
        finally:
            if capture is not None:
                capture.release()


def _convert(frame: np.ndarray, key: str) -> ItemValue:
    try:
        return to_rgb8(frame, key)
    except ImageReadError as error:
        return error


class _Names:
    """Hands out unique output names, case-insensitively, in the order asked."""

    def __init__(self) -> None:
        self.files: Set[str] = set()
        self.dirs: Set[str] = set()

    @staticmethod
    def _variant(name: str, attempt: int) -> str:
        return name if attempt == 1 else f"{name}~{attempt}"

    def file(self, name: str) -> str:
        parent, _, leaf = name.rpartition("/")
        attempt = 1
        while True:
            candidate = (parent + "/" if parent else "") + self._variant(leaf, attempt)
            if candidate.casefold() not in self.files:
                break
            attempt += 1
        self.files.add(candidate.casefold())
        parts = PurePosixPath(candidate).parts
        for depth in range(1, len(parts)):
            self.dirs.add("/".join(parts[:depth]).casefold())
        return candidate

    def root(self, name: str) -> str:
        """A top-level folder name used by no other input."""
        attempt = 1
        while self._variant(name, attempt).casefold() in self.dirs:
            attempt += 1
        chosen = self._variant(name, attempt)
        self.dirs.add(chosen.casefold())
        return chosen


def _relative_name(path: Path, base: Path) -> str:
    # A ".." in a glob (`in/*/../../x/*.png`) must not lead an output name out of the output folder: each
    # ".." becomes a plain folder named "__".
    relative = path.relative_to(base).with_suffix("")
    return "/".join("__" if part == ".." else part for part in relative.parts if part not in ("", ".", "/"))


def _root_name(path: Path, fallback: str) -> str:
    name = path.resolve().name
    return name or fallback


def _glob_base(pattern: str) -> Path:
    """The leading folders of a glob that contain no wildcard: names are given relative to them."""
    parts = Path(pattern).parts
    fixed: List[str] = []
    for part in parts[:-1]:
        if _GLOB_CHARS.search(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


@dataclass
class InputPlan:
    """The resolved inputs of a run, in order; `skipped` lists files in folders that are not images."""

    sources: List[Source]
    skipped: List[ImageReadError]

    @property
    def total(self) -> Optional[int]:
        """Number of items when every source is a list of files; None when videos or streams are present."""
        counts = [source.count for source in self.sources]
        if any(count is None for count in counts):
            return None
        return sum(count for count in counts if count is not None)

    @property
    def has_streams(self) -> bool:
        return any(source.count is None for source in self.sources)


def classify(argument: str) -> str:
    """What an INPUT argument is: "gstreamer", "url", "folder", "video", "image", "glob", "camera" or
    "missing".

    Existing paths win over the other readings, so a file named `0` or `a!b.png` is read as a file.
    """
    path = Path(argument)
    if path.is_dir():
        return "folder"
    if path.is_file():
        return "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"
    if path.is_symlink() or path.exists():
        return "image"  # a dangling link, FIFO or device: reading it reports why it is skipped, never blocks
    if "!" in argument:
        return "gstreamer"
    if _URL.match(argument):
        return "url"
    if argument.isdigit():
        return "camera"
    if _GLOB_CHARS.search(argument):
        return "glob"
    return "missing"


def plan_inputs(arguments: Sequence[str], recursive: bool = True, max_frames: Optional[int] = None,
                policy: Optional[ReconnectPolicy] = None, factory: CaptureFactory = open_capture,
                sleep: Callable[[float], None] = time.sleep) -> InputPlan:
    """Resolve INPUT arguments into sources with unique output names (see the module docstring).

    max_frames limits each video and live source, not files. Problems found here (a missing path, a glob
    matching nothing, a GStreamer pipeline on an OpenCV without GStreamer) become error items, not exceptions.
    """
    policy = policy or ReconnectPolicy()
    names = _Names()
    planned: List[Tuple[str, str, Optional[Source]]] = []
    skipped: List[ImageReadError] = []
    streams: List[Tuple[int, str, str]] = []

    for position, argument in enumerate(arguments):
        kind = classify(argument)
        if kind == "image":
            path = Path(argument)
            planned.append((kind, argument, FileSource(argument, [(argument, names.file(path.stem), path)])))
        elif kind == "folder":
            images, others = list_images(argument, recursive=recursive)
            skipped.extend(others)
            base = Path(argument)
            root = names.root(_root_name(base, "input"))
            entries: List[Tuple[str, str, Union[Path, ImageReadError]]] = [
                (str(image), names.file(f"{root}/{_relative_name(image, base)}"), image) for image in images]
            planned.append((kind, argument, FileSource(argument, entries)))
        elif kind == "glob":
            base = _glob_base(argument)
            matches = sorted(Path(match) for match in globmod.glob(argument, recursive=True))
            entries = []
            for match in matches:
                if match.name.startswith("."):
                    continue
                special = skip_reason(match)
                if special == "folder":
                    continue
                if special is not None:
                    skipped.append(ImageReadError(match, special))
                    continue
                if match.suffix.lower() in VIDEO_SUFFIXES:
                    skipped.append(ImageReadError(match, "a video matched by a glob: name videos separately"))
                    continue
                if match.suffix.lower() not in IMAGE_SUFFIXES:
                    reason = f"not an image file (suffix {match.suffix or 'none'!r})"
                    skipped.append(ImageReadError(match, reason))
                    continue
                entries.append((str(match), names.file(_relative_name(match, base)), match))
            if not entries:
                nothing = ImageReadError(argument, "no image file matches this pattern")
                entries = [(argument, argument, nothing)]
            planned.append((kind, argument, FileSource(argument, entries)))
        elif kind == "missing":
            error = ImageReadError(argument, "no such file or folder (nor a camera index, glob, URL or "
                                             "GStreamer pipeline)")
            planned.append((kind, argument, FileSource(argument, [(argument, argument, error)])))
        else:
            # Stream roots are chosen after every file name is known, so frame names cannot meet a file's.
            planned.append((kind, argument, None))
            streams.append((position, kind, argument))

    for position, kind, argument in streams:
        if kind == "video":
            root = names.root(Path(argument).stem or "video")
            source: Source = VideoFileSource(argument, root, max_frames, factory)
        elif kind == "camera":
            root = names.root(f"camera{int(argument)}")
            source = LiveSource(CaptureTarget("camera", argument), f"camera{int(argument)}", root, max_frames,
                                policy, factory, sleep)
        elif kind == "gstreamer":
            root = names.root("gstreamer")
            if factory is open_capture and not opencv_has_gstreamer():
                error = ImageReadError(root, "this OpenCV build has no GStreamer support (pip's "
                                             "opencv-python wheels lack it); on a Jetson use JetPack's "
                                             "OpenCV (apt package python3-opencv) from a venv made with "
                                             "--system-site-packages")
                source = FileSource(root, [(root, root, error)])
            else:
                if "appsink" in argument and "max-buffers" not in argument:
                    log.warning("%s: appsink without max-buffers queues frames without limit when inference "
                                "is slower than the camera; consider `appsink drop=1 max-buffers=2`", root)
                source = LiveSource(CaptureTarget("gstreamer", argument), root, root, max_frames, policy,
                                    factory, sleep)
        else:
            label = redact_url(argument)
            root = names.root("stream")
            source = LiveSource(CaptureTarget("url", argument), label, root, max_frames, policy, factory,
                                sleep)
        planned[position] = (kind, argument, source)

    return InputPlan([source for _, _, source in planned if source is not None], skipped)


def iter_frames(plan: InputPlan) -> Iterator[Item]:
    """Every frame of every source, in order, numbered from 0."""
    index = 0
    for source in plan.sources:
        for key, name, value in source.items():
            yield FrameKey(key, name, index), value
            index += 1


T = TypeVar("T")
_DONE = object()


def read_ahead(items: Iterable[T], depth: int) -> Generator[T, None, None]:
    """Produce `items` in a background thread, at most `depth` ahead of the consumer; depth 0 = no thread.

    Decoding (cv2.imdecode, VideoCapture.read) releases the GIL, so a decoder thread overlaps with
    pre-processing and inference on the other cores. Exceptions from the producer are raised in the consumer.
    Closing the returned generator stops the producer at its next item.
    """
    if depth <= 0:
        yield from items
        return
    buffer: "queue.Queue[object]" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as error:  # noqa: B036 -- handed to the consumer, which re-raises it
            put(_Failure(error))

    worker = threading.Thread(target=produce, name="read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            value = buffer.get()
            if value is _DONE:
                return
            if isinstance(value, _Failure):
                raise value.error
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        worker.join(timeout=5.0)


@dataclass(frozen=True)
class _Failure:
    error: BaseException


def describe(plan: InputPlan) -> str:
    """One line saying what will be read, for the log."""
    kinds = {"files": 0, "videos": 0, "live": 0}
    for source in plan.sources:
        if isinstance(source, FileSource):
            kinds["files"] += source.count or 0
        elif isinstance(source, VideoFileSource):
            kinds["videos"] += 1
        else:
            kinds["live"] += 1
    parts = [f"{kinds['files']} file input(s)"]
    if kinds["videos"]:
        parts.append(f"{kinds['videos']} video(s)")
    if kinds["live"]:
        parts.append(f"{kinds['live']} live source(s)")
    if plan.skipped:
        parts.append(f"{len(plan.skipped)} non-image file(s) skipped")
    return ", ".join(parts)


__all__ = ["FrameKey", "Item", "ReconnectPolicy", "CaptureTarget", "Capture", "CaptureFactory", "InputPlan",
           "Source", "FileSource", "VideoFileSource", "LiveSource", "classify", "plan_inputs", "iter_frames",
           "read_ahead", "open_capture", "opencv_has_gstreamer", "redact_url", "describe", "VIDEO_SUFFIXES"]
