"""`patchcore-edge run BUNDLE INPUT... [-o OUTDIR]`: score images, folders, globs, videos, cameras and
streams.

JSON lines go to stdout (or --jsonl FILE); progress, warnings and the end summary go to stderr, so stdout can
be piped. Exit status: 0 all inputs scored, 1 some inputs failed (the others were still scored) or there was
nothing to score, 2 the run could not start (bundle, backend, options, outputs that would replace an input or a
file that is not ours) or an output could not be written (the error names the file; the JSON lines written
before it are complete, and no line lists a file that was not written), 130 interrupted (Ctrl-C or SIGTERM;
the summary is printed).

Threads (measured on MVTec bottle test, 83 images 900x900, ONNX Runtime 2 threads, 2 shared cores, 3
interleaved runs, median images/s): maps + PNGs inline 3.6, with one PNG writer thread 4.2; without maps,
read-ahead 0 or 2: 6.0 both.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, Generator, Iterable, Iterator, Optional, Sequence, TextIO, Tuple, Union

import click
import cv2
import numpy as np

from patchcore_edge.bundle import BundleError
from patchcore_edge.fleet.cli import publish_options
from patchcore_edge.imageio import ImageReadError
from patchcore_edge.runtime.detector import Detector
from patchcore_edge.runtime.outputs import (JsonLinesWriter, MapWriter, OutputError, RunStats,
                                            atomic_write_bytes, error_record, format_summary, MapScale,
                                            result_record)
from patchcore_edge.runtime.sources import (FrameKey, Item, ReconnectPolicy, describe, iter_frames,
                                            plan_inputs, read_ahead, redact_url)

log = logging.getLogger("patchcore_edge")

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_CANNOT_START, EXIT_INTERRUPTED = 0, 1, 2, 130
# See the module docstring: a PNG writer thread gave +17 % images/s with maps; a read-ahead thread gave
# nothing, as Detector.stream already decodes (in its pre-processing thread) while the main thread infers.
DEFAULT_READ_AHEAD = 0
DEFAULT_WRITER_THREADS = 1


class CannotStart(click.ClickException):
    exit_code = EXIT_CANNOT_START


@dataclass(frozen=True)
class Tag:
    """What travels with an image through Detector.stream: its key, size, and the image itself when overlays
    need it after scoring (only then, so the stream's queue does not hold extra images)."""

    frame: FrameKey
    height: int
    width: int
    image: Optional[np.ndarray] = field(default=None, compare=False)

    def __str__(self) -> str:
        # The detector names a rejected item by str(key) in its ImageReadError: that must read as the input
        # key.
        return self.frame.key


Scored = Tuple[Tag, Union[Any, ImageReadError]]


def score_frames(detector: Any, frames: Iterable[Item], batch_size: int = 1, maps: bool = True,
                 keep_images: bool = False) -> Generator[Scored, None, None]:
    """(tag, Result or ImageReadError) for every frame, in input order: `Detector.stream` passes error items
    through in their place and overlaps decoding and pre-processing with inference."""

    def items() -> Iterator[Tuple[Tag, Union[np.ndarray, ImageReadError]]]:
        for frame, value in frames:
            if isinstance(value, ImageReadError):
                yield Tag(frame, 0, 0), value
            else:
                height, width = int(value.shape[0]), int(value.shape[1])
                yield Tag(frame, height, width, value if keep_images else None), value

    stream = detector.stream(items(), batch_size=batch_size, maps=maps)
    try:
        yield from stream
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


class StatusLine:
    """A live frames-per-second line on stderr: redrawn in place on a terminal, else a line every 10 s."""

    def __init__(self, stream: TextIO, interval: Optional[float] = None) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.last: Optional[float] = None
        self.window: Deque[float] = deque()
        self.shown = False

    def update(self, stats: RunStats, now: Optional[float] = None) -> None:
        now = time.perf_counter() if now is None else now
        self.window.append(now)
        while self.window and now - self.window[0] > 5.0:
            self.window.popleft()
        if self.last is None:
            self.last = now
        if now - self.last < self.interval:
            return
        self.last = now
        span = self.window[-1] - self.window[0] if len(self.window) > 1 else 0.0
        fps = (len(self.window) - 1) / span if span > 0 else 0.0
        text = f"{stats.images} frames, {fps:.1f} fps (last 5 s), {stats.failures} failed"
        if stats.calibrated:
            text += f", {stats.anomalous} anomalous"
        if self.tty:
            self.stream.write("\r\x1b[K" + text)
            self.shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


class _BarLine:
    """The line click's progress bar redraws; wiped before a log line (the bar redraws itself next)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


class _StatusAwareHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log records on stderr that first wipe the live status or progress line, so they never share a line."""

    status: Optional[Union[StatusLine, _BarLine]] = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.status is not None:
            self.status.clear()
        super().emit(record)


def _install_log_handler() -> _StatusAwareHandler:
    handler = _StatusAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)
    return handler


def _quiet_opencv() -> None:
    # OpenCV prints its own warnings for every failed camera/stream open; the sources log one clear line
    # instead.
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # OpenCV builds without the logging utilities
        pass


@dataclass(frozen=True)
class RunOptions:
    """What `run BUNDLE INPUT...` is asked for (the command builds it from its options)."""

    bundle: Path
    inputs: Sequence[str]
    outdir: Optional[Path] = None
    backend: str = "auto"
    batch_size: int = 1
    maps: bool = True
    overlays: bool = False
    threads: Optional[int] = None
    ef: Optional[int] = None
    exact_search: bool = False
    max_frames: Optional[int] = None
    jsonl: Optional[Path] = None
    recursive: bool = True
    map_range: Optional[Tuple[float, float]] = None
    reconnect_retries: int = 10
    reconnect_delay: float = 0.5
    read_ahead: int = DEFAULT_READ_AHEAD
    writer_threads: int = DEFAULT_WRITER_THREADS


def _load_detector(options: RunOptions) -> Any:
    return Detector.load(options.bundle, backend=options.backend, ef=options.ef,
                         exact_search=options.exact_search, threads=options.threads)


def _silence_stdout() -> None:
    # A reader that went away (`| head`) would make the interpreter's final flush of stdout fail once more.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or path.is_relative_to(folder)


def _is_our_jsonl(path: Path) -> bool:
    """An existing file `run` may overwrite: empty, or JSON lines whose first line is a record of ours."""
    try:
        with open(path, "rb") as handle:
            first = handle.readline(1 << 16)
    except OSError:
        return False
    if not first.strip():
        return path.stat().st_size == 0
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and "path" in record and "index" in record


def output_problem(bundle: Path, inputs: Sequence[str], plan: Any, outdir: Optional[Path],
                   jsonl: Optional[Path]) -> Optional[str]:
    """Why the outputs may not go where asked (checked before any work), or None.

    No output may be an input, lie inside the bundle, or replace a file that is not a run's output; the output
    folder may not lie inside an input folder (the next run would read its PNGs as parts).
    """
    bundle_dir = bundle.resolve()
    files = {Path(entry[2]).resolve() for source in plan.sources for entry in getattr(source, "entries", ())
             if isinstance(entry[2], Path)}
    folders = [Path(a).resolve() for a in inputs if Path(a).is_dir()]
    if jsonl is not None:
        target = jsonl.resolve()
        if target in files:
            return f"--jsonl {jsonl}: is one of the inputs; it would be overwritten before it is read"
        if _inside(target, bundle_dir):
            return f"--jsonl {jsonl}: lies inside the bundle {bundle}; write it elsewhere"
        if target.exists() and not (target.is_file() and _is_our_jsonl(target)):
            return (f"--jsonl {jsonl}: exists and is not a JSON lines file of a run; it is not overwritten: "
                    "choose another name")
    if outdir is not None:
        target = outdir.resolve()
        if _inside(target, bundle_dir) or _inside(bundle_dir, target):
            return f"-o {outdir}: must not be inside the bundle {bundle} (nor contain it)"
        if target in files or target.is_file():
            return f"-o {outdir}: is a file; give a folder for the heat maps"
        for folder in folders:
            if _inside(target, folder):
                return (f"-o {outdir}: lies inside the input folder {folder}; the next run would read its PNGs "
                        "as parts: choose a folder outside it")
    return None


class _InOrder:
    """JSON lines in input order, each written once its PNGs are on disk: a record lists only files that
    exist; one whose PNGs failed gets `output_error` instead of `outputs`, and the run stops (outputs failed)."""

    def __init__(self, sink: JsonLinesWriter, stats: RunStats) -> None:
        self.sink, self.stats = sink, stats
        self.waiting: Deque[Tuple[Dict[str, Any], Optional[Future[None]]]] = deque()
        self.failure: Optional[str] = None

    def put(self, record: Dict[str, Any], pending: Optional[Future[None]]) -> None:
        self.waiting.append((record, pending))
        while self.waiting and (self.waiting[0][1] is None or self.waiting[0][1].done()):
            self._emit(*self.waiting.popleft())
        if self.failure is not None:
            raise OutputError(self.failure)

    def drain(self) -> None:
        while self.waiting:
            self._emit(*self.waiting.popleft())

    def _emit(self, record: Dict[str, Any], pending: Optional[Future[None]]) -> None:
        if pending is not None:
            try:
                pending.result()
            except Exception as error:  # noqa: BLE001 -- the PNG writer's OutputError (or an encoder failure)
                record.pop("outputs", None)
                record["output_error"] = str(error)
                self.failure = self.failure or str(error)
        self.sink.write(record)
        self.stats.add_result(record)


def _write_run_json(outdir: Path, info: Dict[str, Any]) -> None:
    atomic_write_bytes(outdir / "run.json", (json.dumps(info, indent=2, allow_nan=False) + "\n").encode())


@click.command("run")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", "outdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for heat maps, overlays, masks (PNG) and run.json. Without it: JSON lines only.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True,
              help="Feature backend; auto picks a matching TensorRT engine, else ONNX Runtime.")
@click.option("--batch-size", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--maps/--no-maps", default=True, show_default=True,
              help="Compute anomaly maps (heat map PNGs, masks). --no-maps scores images only, faster.")
@click.option("--overlays/--no-overlays", default=False, show_default=True,
              help="Also write the heat map blended over the image.")
@click.option("--threads", type=click.IntRange(1, 256), default=None,
              help="CPU threads for the whole runtime (default: the cores this process may use): "
                   "pre-processing 2 when >= 2, the network all, the search 1 (exact full scans all).")
@click.option("--ef", type=click.IntRange(1, 100_000), default=None,
              help="First-pass search breadth: PatchCore, k-means cells probed per patch (default: 3, "
                   "all cells of a small bank); other methods, HNSW ef (default: the bundle's).")
@click.option("--exact-search", is_flag=True,
              help="Brute-force nearest-neighbour search for every patch instead of the first pass + "
                   "exact re-rank.")
@click.option("--max-frames", type=click.IntRange(1), default=None,
              help="Stop each video, camera or stream after N frames (files are not limited).")
@click.option("--jsonl", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the JSON lines to FILE instead of stdout.")
@click.option("--recursive/--no-recursive", default=True, show_default=True,
              help="Include images in subfolders of folder inputs (output folders mirror them).")
@click.option("--map-range", type=(float, float), default=None, metavar="LOW HIGH",
              help="Fixed heat-map colour range in anomaly-map units (default: from calibration or bundle).")
@click.option("--reconnect-retries", type=click.IntRange(0), default=10, show_default=True,
              help="Live sources: reconnect attempts in a row before giving up.")
@click.option("--reconnect-delay", type=click.FloatRange(0), default=0.5, show_default=True,
              help="Live sources: first reconnect wait in seconds, doubled each attempt up to 30 s.")
@click.option("--read-ahead", type=click.IntRange(0, 64), default=DEFAULT_READ_AHEAD, show_default=True,
              help="Images decoded ahead in one more thread (0: decode in the pre-processing thread). Worth "
                   "trying on many-core boards when decoding is slower than inference.")
@click.option("--writer-threads", type=click.IntRange(0, 16), default=DEFAULT_WRITER_THREADS,
              show_default=True,
              help="Background threads encoding PNGs (0: encode inline).")
@publish_options
def run_command(bundle: Path, inputs: Sequence[str], outdir: Optional[Path], backend: str, batch_size: int,
                maps: bool, overlays: bool, threads: Optional[int], ef: Optional[int], exact_search: bool,
                max_frames: Optional[int], jsonl: Optional[Path], recursive: bool,
                map_range: Optional[Tuple[float, float]], reconnect_retries: int, reconnect_delay: float,
                read_ahead: int, writer_threads: int, fleet: Any) -> None:
    """Score INPUT images with the detector in BUNDLE.

    INPUT: image files, folders, globs ("data/*.png", quoted), video files, camera indices (0, 1), GStreamer
    pipelines (containing "!", e.g. a Jetson CSI camera: "nvarguscamerasrc ! video/x-raw(memory:NVMM),
    width=1280,height=720 ! nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! appsink drop=1
    max-buffers=2") and rtsp:// or http:// streams.
    """
    options = RunOptions(bundle=bundle, inputs=tuple(inputs), outdir=outdir, backend=backend,
                         batch_size=batch_size, maps=maps, overlays=overlays, threads=threads, ef=ef,
                         exact_search=exact_search, max_frames=max_frames, jsonl=jsonl, recursive=recursive,
                         map_range=map_range, reconnect_retries=reconnect_retries,
                         reconnect_delay=reconnect_delay, read_ahead=read_ahead, writer_threads=writer_threads)
    handler = _install_log_handler()
    restore = _stop_on_sigterm()
    try:
        code = _run(options, handler, fleet)
    finally:
        restore()
        log.removeHandler(handler)
    sys.exit(code)


def _stop_on_sigterm() -> Any:
    """SIGTERM (systemd stop, docker stop) ends a run like Ctrl-C: the summary is printed, exit status 130."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _run(options: RunOptions, handler: _StatusAwareHandler, fleet: Any) -> int:
    bundle, inputs, outdir, jsonl = options.bundle, options.inputs, options.outdir, options.jsonl
    maps, overlays, map_range, batch_size = options.maps, options.overlays, options.map_range, options.batch_size
    if map_range is not None and not (math.isfinite(map_range[0]) and math.isfinite(map_range[1])
                                      and map_range[1] > map_range[0]):
        raise CannotStart(f"--map-range needs finite LOW < HIGH, got {map_range[0]} {map_range[1]}")
    if overlays and not maps:
        raise CannotStart("--overlays needs the anomaly maps: drop --no-maps")
    if overlays and outdir is None:
        raise CannotStart("--overlays writes PNG files: give an output folder with -o OUTDIR")

    if outdir is not None and not maps:
        log.info("--no-maps: nothing is written to %s", outdir)
    _quiet_opencv()
    policy = ReconnectPolicy(max_retries=options.reconnect_retries, initial_delay=options.reconnect_delay)
    plan = plan_inputs(inputs, recursive=options.recursive, max_frames=options.max_frames, policy=policy)
    for skipped in plan.skipped:
        log.info("skipped %s: %s", skipped.path, skipped.reason)
    if plan.total == 0:
        log.error("no images found in %s", " ".join(inputs))
        return EXIT_FAILED_INPUTS
    problem = output_problem(bundle, inputs, plan, outdir if maps else None, jsonl)
    if problem is not None:
        raise CannotStart(problem)

    try:
        detector = _load_detector(options)
    except ImportError as error:
        raise CannotStart(f"the runtime is not available: {error}") from None
    except Exception as error:  # noqa: BLE001 -- any load failure is reported in one line, not a traceback
        raise CannotStart(f"cannot load bundle {bundle}: {error}") from None

    calibration = getattr(detector, "calibration", None)
    if getattr(detector, "calibration_refused", None):
        log.warning("%s", detector.calibration_refused)
    writer = None
    run_info: Dict[str, Any] = {"bundle": str(bundle),
                                "backend": getattr(detector, "backend_name", options.backend),
                                "calibrated": calibration is not None,
                                "inputs": [redact_url(argument) for argument in inputs]}
    if outdir is not None and maps:
        scale = (MapScale(float(map_range[0]), float(map_range[1]), "--map-range") if map_range is not None
                 else getattr(detector, "map_scale", None))
        writer = MapWriter(outdir, scale, heatmaps=True, overlays=overlays, workers=options.writer_threads)
    log.info("reading %s; backend %s", describe(plan), run_info["backend"])
    spec = getattr(detector, "spec", None)
    if spec is not None:  # issue 18: say what the network inspects
        run_info["input"] = spec.describe()
        log.info("input: %s", run_info["input"])

    try:
        sink = JsonLinesWriter(target=jsonl) if jsonl is not None else JsonLinesWriter(stream=sys.stdout)
    except OSError as error:
        raise CannotStart(f"cannot write {jsonl}: {error.strerror or error}") from None

    stats = RunStats(skipped=len(plan.skipped))
    status = StatusLine(sys.stderr) if plan.has_streams else None
    handler.status = status if status is not None else _BarLine(sys.stderr)
    started = time.perf_counter()
    interrupted = False
    fatal: Optional[str] = None
    records = _InOrder(sink, stats)
    publisher = fleet.open(detector)  # fleet/: never waits on the network; a no-op without --publish
    frames = read_ahead(iter_frames(plan), options.read_ahead)
    scored = score_frames(detector, frames, batch_size=batch_size, maps=maps,
                          keep_images=overlays or publisher.wants_images)
    progress = None
    try:
        if status is None:
            progress = click.progressbar(length=plan.total or 0, label="scoring", file=sys.stderr,
                                         show_pos=True, show_eta=True)
            progress.__enter__()
        for tag, outcome in scored:
            pending_png: Optional[Future[None]] = None
            if isinstance(outcome, ImageReadError):
                log.warning("%s: %s", tag.frame.key, outcome.reason)
                record = error_record(tag.frame, outcome)
            else:
                files: Dict[str, str] = {}
                failed: Optional[OutputError] = None
                if writer is not None:
                    try:
                        files, pending_png = writer.submit(tag.frame.name, outcome.anomaly_map,
                                                           getattr(outcome, "mask", None), tag.image, outcome.score)
                    except OutputError as error:
                        failed = error
                record = result_record(tag.frame, outcome, tag.height, tag.width, files)
                if failed is not None:
                    record["output_error"] = str(failed)
                    records.put(record, None)
                    raise failed
            records.put(record, pending_png)
            publisher.publish(record, outcome, tag.image)
            if progress is not None:
                progress.update(1)
            if status is not None:
                status.update(stats)
    except KeyboardInterrupt:
        interrupted = True
    except OutputError as error:
        fatal = str(error)
    except BundleError as error:
        fatal = str(error)
    except BrokenPipeError:
        fatal = "stdout was closed (broken pipe); use --jsonl FILE to keep the results"
        _silence_stdout()
    finally:
        scored.close()
        try:
            frames.close()
        except ValueError:  # still running in a detector thread that did not stop; it is a daemon thread
            pass
        if progress is not None:
            progress.__exit__(None, None, None)
        if status is not None:
            status.clear()
        handler.status = None
        publisher.close()
        close = getattr(detector, "close", None)
        if close is not None:
            close()
    try:
        records.drain()  # waits for the pending PNGs: they count in the wall time
    except OutputError as error:
        fatal = fatal or str(error)
    except BrokenPipeError:
        fatal = fatal or "stdout was closed (broken pipe); use --jsonl FILE to keep the results"
        _silence_stdout()
    sink.close()
    fatal = fatal or records.failure
    if writer is not None:
        try:
            writer.close()
        except OutputError as error:
            fatal = fatal or str(error)
    wall = time.perf_counter() - started

    if writer is not None:
        if writer.scale is not None:
            run_info["map_scale"] = writer.scale.to_json()
        run_info["summary"] = {"images": stats.images, "failures": stats.failures,
                               "anomalous": stats.anomalous if stats.calibrated else None,
                               "wall_s": round(wall, 3)}
        try:
            _write_run_json(outdir, run_info)  # type: ignore[arg-type]
        except OSError as error:
            fatal = fatal or f"cannot write {outdir}/run.json: {error.strerror or error}"

    click.echo(format_summary(stats, wall, str(run_info["backend"]), batch_size,
                              outdir if writer is not None else None, interrupted), err=True)
    if fatal is not None:
        click.echo(f"Error: {fatal}", err=True)
        return EXIT_CANNOT_START
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED_INPUTS if stats.failures else EXIT_OK


__all__ = ["RunOptions", "run_command", "score_frames", "StatusLine", "Tag", "EXIT_OK", "EXIT_FAILED_INPUTS",
           "EXIT_CANNOT_START", "EXIT_INTERRUPTED"]
