"""`run --publish URL ...` options (one object for the run command) and the `fleet` command group."""

from __future__ import annotations

import functools
import hashlib
import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import click

from .. import __version__
from .publisher import Publisher, PublisherConfig
from .spool import Spool, SpoolError
from .url import FleetError, parse_broker_url
from .watch import watch

TLS_FILE = click.Path(exists=True, dir_okay=False)


class FleetStartError(click.ClickException):
    exit_code = 2


class NoPublisher:
    wants_images = False

    def publish(self, record: Any, result: Any = None, image: Any = None) -> None:
        pass

    def close(self) -> None:
        pass


def identity(detector: Any) -> Dict[str, Any]:
    """bundle_id (of the score-defining files), calibration_id, backend, version and the nominal quantiles."""
    bundle = getattr(detector, "bundle", None)
    digests = sorted(bundle.fingerprint().values()) if bundle is not None else []
    calibration = getattr(detector, "calibration", None)
    ref = bundle.calibration if bundle is not None else None
    out: Dict[str, Any] = {"bundle_id": hashlib.sha256("".join(digests).encode()).hexdigest()[:12],
                           "calibration_id": Path(ref.file).stem if ref is not None else None,
                           "backend": getattr(detector, "backend_name", None), "version": __version__}
    if calibration is not None:
        out["threshold"] = calibration.image.threshold
        out["nominal_quantiles"] = dict(calibration.nominal_scores)
    return out


@dataclass
class FleetOptions:
    publish: Optional[str]
    device_id: Optional[str]
    camera: str
    ca_file: Optional[str]
    cert_file: Optional[str]
    key_file: Optional[str]
    spool: Optional[Path]
    spool_max_mb: float
    publish_maps_kb: int

    def open(self, detector: Any) -> Any:
        """A started Publisher, or a no-op when --publish is not given (nothing connects anywhere then)."""
        if not self.publish:
            return NoPublisher()
        try:
            config = PublisherConfig(url=parse_broker_url(self.publish),
                                     device=self.device_id or socket.gethostname(), camera=self.camera,
                                     spool_dir=self.spool, spool_max_bytes=int(self.spool_max_mb * 2**20),
                                     ca_file=self.ca_file, cert_file=self.cert_file, key_file=self.key_file,
                                     map_max_bytes=self.publish_maps_kb * 1024, identity=identity(detector))
            scale = getattr(detector, "map_scale", None) if config.map_max_bytes else None
            return Publisher(config, map_scale=scale)
        except (FleetError, SpoolError) as error:
            raise FleetStartError(f"--publish: {error}") from None


def tls_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
            click.option("--ca-file", type=TLS_FILE, default=None, help="mqtts://: CA certificate (PEM)."),
            click.option("--cert-file", type=TLS_FILE, default=None, help="mqtts://: client certificate."),
            click.option("--key-file", type=TLS_FILE, default=None, help="mqtts://: client key.")]):
        function = option(function)
    return function


def publish_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the fleet options to `run` and hands them to it as one `fleet: FleetOptions` argument."""

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        names = FleetOptions.__dataclass_fields__
        fleet = FleetOptions(**{name: kwargs.pop(name) for name in list(names)})
        return command(fleet=fleet, **kwargs)

    options: List[Callable[[Any], Any]] = [
        click.option("--publish", metavar="URL", default=None,
                     help="Publish every decision to mqtt://[user[:pw]@]host[:port]/PREFIX (or mqtts://)."),
        click.option("--device-id", default=None, help="Board name in the topics (default: the host name)."),
        click.option("--camera", default="cam0", show_default=True, help="Camera name in the topics."),
        tls_options,
        click.option("--spool", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Store-and-forward folder (default: ~/.local/state/patchcore-edge/spool/DEVICE)."),
        click.option("--spool-max-mb", type=click.FloatRange(0.01), default=256.0, show_default=True),
        click.option("--publish-maps-kb", type=click.IntRange(0), default=0, show_default=True,
                     help="Also publish heat-map JPEGs of anomalous parts, each at most this size (0: none)."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@click.group("fleet")
def fleet_group() -> None:
    """Watch boards that publish to an MQTT broker."""


@fleet_group.command("watch")
@click.argument("url")
@tls_options
@click.option("--jsonl", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also record every message received as a JSON line.")
@click.option("--duration", type=click.FloatRange(0), default=None, help="Stop after S seconds.")
@click.option("--silent-after", type=click.FloatRange(1), default=60.0, show_default=True)
@click.option("--interval", type=click.FloatRange(0.1), default=2.0, show_default=True)
def watch_command(url: str, ca_file: Optional[str], cert_file: Optional[str], key_file: Optional[str],
                  jsonl: Optional[Path], duration: Optional[float], silent_after: float, interval: float) -> None:
    """A terminal view of every board publishing under mqtt://host/PREFIX."""
    try:
        watch(parse_broker_url(url), ca_file, cert_file, key_file, jsonl, duration, silent_after, interval)
    except FleetError as error:
        raise FleetStartError(str(error)) from None


@fleet_group.command("spool")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
def spool_command(folder: Path) -> None:
    """What waits in a spool folder and what was dropped."""
    try:
        spool = Spool(folder, max_bytes=2**62)
    except SpoolError as error:
        raise FleetStartError(str(error)) from None
    click.echo(json.dumps({"messages": spool.count, "bytes": spool.bytes, **spool.counters()}))
    spool.close()


