"""The publisher: one JSON message per decision, QoS 1, through the spool, without ever blocking inference.

The caller's `publish` only puts the record on an in-memory queue (bounded; when full the record is counted as
dropped, never waited for). One background thread writes the queue to the spool in batches and hands spooled
messages, oldest first, to paho-mqtt (at most WINDOW in flight); paho's own network thread connects,
reconnects with back-off and resends unacknowledged messages. A message leaves the spool on its PUBACK. A broker
that accepts TCP but never answers is dropped after the keep-alive and retried.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import cv2
import numpy as np

from ..runtime.outputs import colourise
from .spool import MAP, RESULT, Spool, default_spool_dir
from .url import BrokerUrl, FleetError, map_topic, result_topic, status_topic

log = logging.getLogger("patchcore_edge")
WINDOW = 100
QUEUE_LIMIT = 10_000
MAPS_PENDING_LIMIT = 8


@dataclass
class PublisherConfig:
    url: BrokerUrl
    device: str = field(default_factory=socket.gethostname)
    camera: str = "cam0"
    spool_dir: Optional[Path] = None
    spool_max_bytes: int = 256 * 1024 * 1024
    ca_file: Optional[str] = None
    cert_file: Optional[str] = None
    key_file: Optional[str] = None
    keepalive: int = 10
    drain_s: float = 10.0
    map_max_bytes: int = 0  # 0: no map JPEGs
    identity: Dict[str, Any] = field(default_factory=dict)  # bundle_id, calibration_id, backend, version, ...


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_client(url: BrokerUrl, client_id: str, ca_file: Optional[str] = None, cert_file: Optional[str] = None,
                key_file: Optional[str] = None) -> Any:
    """A paho client with the URL's credentials and TLS (the system's CAs unless --ca-file)."""
    try:
        import paho.mqtt.client as mqtt
    except ImportError:
        raise FleetError("MQTT needs paho-mqtt: pip install \"patchcore-edge[mqtt]\"") from None
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    if url.username:
        client.username_pw_set(url.username, url.password)
    if url.tls:
        try:
            client.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file)
        except (OSError, ValueError) as error:
            raise FleetError(f"TLS files ({ca_file}, {cert_file}, {key_file}): {error}") from None
    elif ca_file or cert_file or key_file:
        raise FleetError("--ca-file/--cert-file/--key-file need an mqtts:// URL")
    client.connect_timeout = 3.0
    client.reconnect_delay_set(1, 30)
    return client


def capped_jpeg(image_bgr: np.ndarray, max_bytes: int) -> Optional[bytes]:
    """The image as a JPEG of at most max_bytes: lower quality first, then halve the size; None if impossible."""
    while min(image_bgr.shape[:2]) >= 16:
        for quality in (85, 65, 45):
            ok, data = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
            if ok and len(data) <= max_bytes:
                return data.tobytes()
        image_bgr = cv2.resize(image_bgr, (image_bgr.shape[1] // 2, image_bgr.shape[0] // 2),
                               interpolation=cv2.INTER_AREA)
    return None


class Publisher:
    def __init__(self, config: PublisherConfig, map_scale: Any = None) -> None:
        self.config = config
        self.run_id = uuid.uuid4().hex[:8]
        self.map_scale = map_scale
        self._n = 0
        self._queue: "queue.Queue[Any]" = queue.Queue()
        self._maps_pending = 0
        self.dropped_unspooled = 0
        self.published = 0
        self.connected = threading.Event()
        prefix, device = config.url.prefix, config.device
        self.result_topic = result_topic(prefix, device, config.camera)
        self.status_topic = status_topic(prefix, device)
        self.spool = Spool(config.spool_dir or default_spool_dir() / device, config.spool_max_bytes)
        self.client = make_client(config.url, f"patchcore-edge-{device}-{config.camera}", config.ca_file,
                                  config.cert_file, config.key_file)
        self.client.max_inflight_messages_set(WINDOW)
        self.client.will_set(self.status_topic, self._status("offline", reason="connection lost"), qos=1,
                             retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.connected.clear()
        self.client.on_publish = lambda _c, _u, mid, *_: self._queue.put(("ack", mid))
        self.client.connect_async(config.url.host, config.url.port, keepalive=config.keepalive)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._forward, name="fleet-publisher", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- caller side: never waits
    @property
    def wants_images(self) -> bool:
        return False

    def publish(self, record: Mapping[str, Any], result: Any = None, image: Optional[np.ndarray] = None) -> None:
        self._n += 1
        anomaly_map = None
        if (self.config.map_max_bytes and result is not None and getattr(result, "is_anomalous", None)
                and self.map_scale is not None and self._maps_pending < MAPS_PENDING_LIMIT):
            anomaly_map = getattr(result, "anomaly_map", None)
            if anomaly_map is not None:
                self._maps_pending += 1
        if self._queue.qsize() >= QUEUE_LIMIT:
            self.dropped_unspooled += 1
            return
        self._queue.put(("msg", self._n, utc_now(), record, anomaly_map))

    # ---------------------------------------------------------------- background thread
    def _status(self, state: str, **extra: Any) -> bytes:
        status = {"state": state, "device": self.config.device, "camera": self.config.camera, "time": utc_now(),
                  **self.config.identity, **extra}
        return json.dumps(status).encode()

    def _spool_counts(self) -> Dict[str, int]:
        return {"messages": self.spool.count, "bytes": self.spool.bytes, **self.spool.counters(),
                "dropped_before_spool": self.dropped_unspooled}

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any = None) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("MQTT broker %s refused the connection: %s", self.config.url.redacted(), reason)
            return
        self.connected.set()
        self._queue.put(("connected",))

    def _encode(self, item: Any) -> list:
        _, n, stamp, record, anomaly_map = item
        message_id = f"{self.run_id}-{n}"
        payload = dict(record, message_id=message_id, seq=n, run=self.run_id, time=stamp,
                       device=self.config.device, camera=self.config.camera,
                       bundle_id=self.config.identity.get("bundle_id"),
                       calibration_id=self.config.identity.get("calibration_id"))
        out = []
        if anomaly_map is not None:
            self._maps_pending -= 1
            jpeg = capped_jpeg(colourise(anomaly_map, self.map_scale), self.config.map_max_bytes)
            if jpeg is not None:
                topic = map_topic(self.config.url.prefix, self.config.device, self.config.camera, message_id)
                payload["map_topic"] = topic
                out.append((MAP, topic, jpeg))
        out.insert(0, (RESULT, self.result_topic, json.dumps(payload, allow_nan=False).encode()))
        return out

    def _forward(self) -> None:
        inflight: Dict[int, int] = {}  # paho mid -> spool seq
        handed = 0  # highest spool seq given to paho
        closing: Optional[float] = None
        while True:
            try:
                events = [self._queue.get(timeout=0.2)]
            except queue.Empty:
                events = []
            while len(events) < 1000:
                try:
                    events.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            messages, acked = [], []
            for event in events:
                if event[0] == "msg":
                    messages.extend(self._encode(event))
                elif event[0] == "ack":
                    seq = inflight.pop(event[1], None)
                    if seq is not None:
                        acked.append(seq)
                        self.published += 1
                elif event[0] == "connected":
                    self.client.publish(self.status_topic, self._status("online", spool=self._spool_counts()),
                                        qos=1, retain=True)
                elif event[0] == "close":
                    closing = time.monotonic() + self.config.drain_s
            try:
                if messages:
                    self.spool.add(messages)
                self.spool.remove(acked)
            except Exception as error:  # noqa: BLE001 -- a full disk must not stop the run; say it once
                log.warning("spool %s: %s", self.spool.folder, error)
            if len(inflight) < WINDOW:
                for seq, topic, payload in self.spool.after(handed, WINDOW - len(inflight)):
                    info = self.client.publish(topic, payload, qos=1)
                    inflight[info.mid] = seq
                    handed = seq
            if closing is not None and ((self.spool.count == 0 and not inflight) or time.monotonic() > closing):
                return

    def close(self) -> Dict[str, int]:
        """Send what can be sent within drain_s; what is left stays in the spool for the next run."""
        self._queue.put(("close",))
        self._thread.join()
        counts = self._spool_counts()
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, self._status("offline", reason="run ended",
                                                                       spool=counts), qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()
        self.spool.close()
        if counts["messages"]:
            log.warning("%d messages stay in the spool %s; the next run with this spool sends them",
                        counts["messages"], self.spool.folder)
        dropped = {k: v for k, v in counts.items() if k.startswith("dropped") and v}
        if dropped:
            log.warning("spool full: dropped %s (counted in the spool, reported in the status topic)", dropped)
        return counts
