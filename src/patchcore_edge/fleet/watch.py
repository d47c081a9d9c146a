"""`fleet watch`: every board's status, images per minute, anomaly rate, last decision, score drift against the
calibration's nominal quantiles, silent boards; optionally every message recorded as JSON lines."""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Deque, Dict, Optional, Set, Tuple

from ..stats import distribution_shift
from .publisher import make_client, utc_now
from .url import BrokerUrl

RECENT = 200


class Board:
    def __init__(self) -> None:
        self.status: Dict[str, Any] = {}
        self.decisions: Deque[Tuple[float, Optional[float], Optional[bool]]] = deque(maxlen=RECENT)
        self.last: Dict[str, Any] = {}
        self.heard = 0.0


class FleetView:
    def __init__(self, silent_after: float = 60.0) -> None:
        self.boards: Dict[str, Board] = {}
        self.seen: Set[str] = set()
        self.silent_after = silent_after
        self.lock = threading.Lock()

    def handle(self, topic: str, payload: bytes, now: float) -> None:
        levels = topic.split("/")
        try:
            message = json.loads(payload)
        except ValueError:
            return
        with self.lock:
            if levels[-1] == "status" and len(levels) >= 2:
                board = self.boards.setdefault(levels[-2], Board())
                board.status = message
                board.heard = now
            elif levels[-1] == "result" and len(levels) >= 3:
                if message.get("message_id") in self.seen:
                    return  # a resend after a reconnect
                self.seen.add(message.get("message_id"))
                board = self.boards.setdefault(levels[-3], Board())
                board.decisions.append((now, message.get("score"), message.get("anomalous")))
                board.last, board.heard = message, now

    def render(self, now: float) -> str:
        rows = [f"{'board':<20} {'state':<8} {'img/min':>7} {'anom %':>6} {'last decision':<22} {'drift IQR':>9}"]
        with self.lock:
            for name, board in sorted(self.boards.items()):
                state = board.status.get("state", "?")
                if state == "online" and now - board.heard > self.silent_after:
                    state = "SILENT"
                per_min = sum(1 for t, _, _ in board.decisions if now - t <= 60)
                flags = [a for _, _, a in board.decisions if a is not None]
                rate = f"{100.0 * sum(flags) / len(flags):.1f}" if flags else "-"
                last = board.last
                decision = {True: "ANOMALY", False: "ok", None: "score"}[last.get("anomalous")] if last else "-"
                if last.get("score") is not None:
                    decision += f" {last['score']:.3g} {now - board.heard:.0f}s ago"
                scores = [s for _, s, _ in board.decisions if s is not None]
                drift = "-"
                reference = board.status.get("nominal_quantiles")
                if reference and len(scores) >= 20:
                    shift = distribution_shift(reference, scores)
                    drift = f"{shift.median_shift_iqr:+.2f}" + (" MOVED" if shift.moved else "")
                rows.append(f"{name:<20} {state:<8} {per_min:>7} {rate:>6} {decision:<22} {drift:>9}")
        return "\n".join(rows)


def watch(url: BrokerUrl, ca_file: Optional[str], cert_file: Optional[str], key_file: Optional[str],
          jsonl: Optional[Path], duration: Optional[float], silent_after: float, interval: float) -> None:
    view = FleetView(silent_after)
    record = open(jsonl, "a", encoding="utf-8") if jsonl is not None else None
    client = make_client(url, f"patchcore-edge-watch-{uuid.uuid4().hex[:6]}", ca_file, cert_file, key_file)

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        view.handle(message.topic, message.payload, time.time())
        if record is not None:
            try:
                body: Any = json.loads(message.payload)
            except ValueError:
                body = {"bytes": len(message.payload)}
            record.write(json.dumps({"received": utc_now(), "topic": message.topic, "payload": body}) + "\n")
            record.flush()

    client.on_connect = lambda c, *_: c.subscribe([(f"{url.prefix}/+/status", 1), (f"{url.prefix}/+/+/result", 1)])
    client.on_message = on_message
    client.connect_async(url.host, url.port, keepalive=30)
    client.loop_start()
    tty = sys.stdout.isatty()
    end = time.monotonic() + duration if duration is not None else None
    try:
        while end is None or time.monotonic() < end:
            time.sleep(min(interval, max(0.0, end - time.monotonic())) if end else interval)
            sys.stdout.write(("\x1b[H\x1b[2J" if tty else "\n") + view.render(time.time()) + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
        if record is not None:
            record.close()
