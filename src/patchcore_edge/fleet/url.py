"""mqtt://[user[:password]@]host[:port]/PREFIX and mqtts://... broker addresses, and the topic names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
from urllib.parse import unquote, urlsplit


class FleetError(ValueError):
    """A fleet setting or file that cannot be used; the message names it."""


@dataclass(frozen=True)
class BrokerUrl:
    tls: bool
    host: str
    port: int
    prefix: str
    username: Optional[str] = None
    password: Optional[str] = None

    def redacted(self) -> str:
        user = f"{self.username}:***@" if self.password is not None else (f"{self.username}@" if self.username else "")
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}/{self.prefix}"


def _level(name: str, what: str) -> str:
    if not name or any(c in name for c in "/+#\x00"):
        raise FleetError(f"{what} {name!r} must be non-empty, without '/', '+', '#'")
    return name


def parse_broker_url(text: str) -> BrokerUrl:
    parts = urlsplit(text)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise FleetError(f"broker URL {text!r}: the scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise FleetError(f"broker URL {text!r}: no host")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise FleetError(f"broker URL {text!r}: bad port") from None
    prefix = parts.path.strip("/")
    if not prefix:
        raise FleetError(f"broker URL {text!r}: give a topic prefix, e.g. mqtt://host/plant1")
    for level in prefix.split("/"):
        _level(level, f"broker URL {text!r}: topic level")
    return BrokerUrl(parts.scheme == "mqtts", parts.hostname, port, prefix,
                     unquote(parts.username) if parts.username else None,
                     unquote(parts.password) if parts.password is not None else None)


def result_topic(prefix: str, device: str, camera: str) -> str:
    return f"{prefix}/{_level(device, 'device id')}/{_level(camera, 'camera')}/result"


def map_topic(prefix: str, device: str, camera: str, message_id: str) -> str:
    return f"{prefix}/{device}/{camera}/map/{message_id}"


def status_topic(prefix: str, device: str) -> str:
    return f"{prefix}/{_level(device, 'device id')}/status"
