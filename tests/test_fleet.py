"""Fleet publishing against a real Mosquitto broker on loopback: topics and payloads, retained status and last
will, broker restart mid-run (exactly once after de-dup, in order), SIGKILL while the broker is down, spool full,
a silent TCP server, user/password."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from mosquitto_broker import Broker

mqtt = pytest.importorskip("paho.mqtt.client")

from patchcore_edge.fleet.publisher import Publisher, PublisherConfig  # noqa: E402
from patchcore_edge.fleet.spool import Spool  # noqa: E402
from patchcore_edge.fleet.url import FleetError, parse_broker_url  # noqa: E402


@pytest.fixture
def broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    b = Broker(tmp_path / "broker")
    yield b
    b.stop()


class Subscriber:
    """A persistent-session subscriber (its queue survives a broker restart), collecting JSON payloads."""

    def __init__(self, port: int, topic: str, client_id: str = "test-sub", auth: Any = None) -> None:
        self.messages: List[Any] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        if auth:
            self.client.username_pw_set(*auth)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_disconnect = lambda *_: self.subscribed.clear()
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload, m.retain))
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()

    def wait(self, condition: Any, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition(self.messages):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def results(messages: List[Any]) -> List[Dict[str, Any]]:
    return [json.loads(p) for t, p, _ in messages if t.endswith("/result")]


def dedup(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    seen, out = set(), []
    for record in records:
        if record["message_id"] not in seen:
            seen.add(record["message_id"])
            out.append(record)
    return out


def config(port: int, spool: Path, **kw: Any) -> PublisherConfig:
    return PublisherConfig(url=parse_broker_url(f"mqtt://127.0.0.1:{port}/plant"), device="board1",
                           camera="cam0", spool_dir=spool, identity={"bundle_id": "b123", "backend": "onnxruntime"},
                           **kw)


def test_broker_url_parsing() -> None:
    url = parse_broker_url("mqtts://op%40x:s3cret@broker.local/plant/line2")
    assert (url.tls, url.host, url.port, url.prefix, url.username, url.password) == (
        True, "broker.local", 8883, "plant/line2", "op@x", "s3cret")
    assert "s3cret" not in url.redacted()
    assert parse_broker_url("mqtt://h:1999/p").port == 1999
    for bad in ("http://h/p", "mqtt://h", "mqtt://h/a/+/b", "mqtt://h:99999/p"):
        with pytest.raises(FleetError):
            parse_broker_url(bad)


def test_spool_full_drops_oldest_maps_first_then_results_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s", max_bytes=1000)
    spool.add([("result", "t", b"r" * 99), ("map", "t", b"m" * 299), ("result", "t", b"r" * 99),
               ("map", "t", b"m" * 299)])
    assert spool.bytes == 800
    spool.add([("result", "t", b"r" * 399)])  # needs 400: the oldest map goes, then the next
    kinds = [payload[:1] for _, _, payload in spool.after(0, 100)]
    assert kinds == [b"r", b"r", b"m", b"r"] and spool.counters() == {"dropped_maps": 1}
    assert spool.bytes == 900
    spool.add([("result", "t", b"r" * 699)])
    assert spool.counters() == {"dropped_maps": 2, "dropped_results": 3}  # the oldest results, in order
    assert spool.bytes == 700 and [len(p) for _, _, p in spool.after(0, 100)] == [699]
    spool.add([("map", "t", b"m" * 999)])  # a map never evicts a result: it is dropped itself
    assert spool.counters()["dropped_maps"] == 3
    spool.close()
    first = Spool(tmp_path / "s", 1000)
    with pytest.raises(OSError, match="in use"):
        Spool(tmp_path / "s", 1000)
    first.close()


def test_topics_payload_retained_status_and_last_will(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.port, "plant/#")
    publisher = Publisher(config(broker.port, tmp_path / "spool"))
    for i in range(20):
        publisher.publish({"path": f"img{i}.png", "index": i, "score": 0.5 + i})
    assert sub.wait(lambda m: len(results(m)) >= 20)
    counts = publisher.close()
    assert counts["messages"] == 0
    got = results(sub.messages)
    assert [r["path"] for r in got] == [f"img{i}.png" for i in range(20)]
    assert all(t == "plant/board1/cam0/result" for t, _, _ in sub.messages if t.endswith("result"))
    assert got[3]["score"] == 3.5 and got[3]["bundle_id"] == "b123" and got[3]["seq"] == 4
    assert sub.wait(lambda m: any(json.loads(p)["state"] == "offline" for t, p, _ in m if t.endswith("status")))
    sub.close()
    # Retained: a new subscriber gets the last status at once.
    late = Subscriber(broker.port, "plant/+/status", client_id="late")
    assert late.wait(lambda m: len(m) >= 1)
    topic, payload, retained = late.messages[0]
    assert topic == "plant/board1/status" and retained and json.loads(payload)["reason"] == "run ended"
    # Last will: a board that vanishes (here: its socket closed without DISCONNECT) is marked offline.
    board = Publisher(config(broker.port, tmp_path / "spool2"))
    assert late.wait(lambda m: any(json.loads(p)["state"] == "online" for _, p, _ in m))
    board.client.socket().close()
    assert late.wait(lambda m: json.loads(m[-1][1]).get("reason") == "connection lost", timeout=15)
    late.close()


def test_broker_restart_mid_run_every_decision_exactly_once_in_order(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.port, "plant/+/+/result")
    publisher = Publisher(config(broker.port, tmp_path / "spool"))
    slowest = 0.0
    for i in range(300):
        started = time.perf_counter()
        publisher.publish({"path": f"img{i}.png", "index": i, "score": float(i)})
        slowest = max(slowest, time.perf_counter() - started)
        if i == 100:
            assert sub.wait(lambda m: len(m) >= 50)
            broker.stop()
        if i == 200:
            broker.start()
        time.sleep(0.005)
    assert sub.wait(lambda m: len(dedup(results(m))) >= 300, timeout=30)
    publisher.close()
    unique = dedup(results(sub.messages))
    assert [r["index"] for r in unique] == list(range(300))
    assert slowest < 0.05  # publish() never waited on the broker
    sub.close()


BOARD = """
import sys, time
from pathlib import Path
from patchcore_edge.fleet.publisher import Publisher, PublisherConfig
from patchcore_edge.fleet.url import parse_broker_url
p = Publisher(PublisherConfig(parse_broker_url(sys.argv[1]), device="board1", camera="cam0",
                              spool_dir=Path(sys.argv[2])))
for i in range(int(sys.argv[3])):
    p.publish({"path": f"img{i}.png", "index": i})
time.sleep(1.0)
print("spooled", p.spool.count, flush=True)
time.sleep(60)
"""


def test_sigkill_while_broker_down_then_restart_delivers_the_spool(broker: Broker, tmp_path: Path) -> None:
    sub = Subscriber(broker.port, "plant/+/+/result")
    assert sub.wait(lambda m: sub.client.is_connected(), timeout=5)
    time.sleep(0.3)
    broker.stop()
    url, spool = f"mqtt://127.0.0.1:{broker.port}/plant", str(tmp_path / "spool")
    board = subprocess.Popen([sys.executable, "-c", BOARD, url, spool, "40"], stdout=subprocess.PIPE, text=True)
    assert board.stdout is not None and board.stdout.readline().strip() == "spooled 40"
    board.kill()
    board.wait()
    broker.start()
    assert sub.subscribed.wait(10)
    publisher = Publisher(config(broker.port, tmp_path / "spool"))  # the next run on this board
    assert sub.wait(lambda m: len(dedup(results(m))) >= 40, timeout=30)
    assert publisher.close()["messages"] == 0
    assert [r["index"] for r in dedup(results(sub.messages))] == list(range(40))
    sub.close()


def test_silent_tcp_server_never_stalls_inference(tmp_path: Path) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    accepted: List[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
    cfg = config(server.getsockname()[1], tmp_path / "spool", drain_s=0.5)
    publisher = Publisher(cfg)
    started = time.perf_counter()
    for i in range(2000):
        publisher.publish({"path": f"img{i}.png", "index": i})
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"2000 publish() calls took {elapsed:.2f} s"
    closing = time.perf_counter()
    counts = publisher.close()
    assert time.perf_counter() - closing < 8.0
    assert counts["messages"] == 2000 and accepted  # all kept for later; the server was reached
    server.close()


def test_user_password_refused_and_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "broker"
    folder.mkdir()
    passwords = folder / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "board", "right"], check=True,
                   capture_output=True)
    broker = Broker(folder, ["allow_anonymous false", f"password_file {passwords}"])
    try:
        sub = Subscriber(broker.port, "plant/#", auth=("board", "right"))
        wrong = Publisher(PublisherConfig(parse_broker_url(f"mqtt://board:wrong@127.0.0.1:{broker.port}/plant"),
                                          device="b", spool_dir=tmp_path / "s1", drain_s=1.0))
        wrong.publish({"index": 0})
        assert wrong.close()["messages"] == 1 and not wrong.connected.is_set()
        right = Publisher(PublisherConfig(parse_broker_url(f"mqtt://board:right@127.0.0.1:{broker.port}/plant"),
                                          device="b", spool_dir=tmp_path / "s1"))
        assert sub.wait(lambda m: len(results(m)) >= 1)  # the refused run's spooled message
        assert right.close()["messages"] == 0
        sub.close()
    finally:
        broker.stop()


def test_tls_with_a_test_made_certificate(tmp_path: Path) -> None:
    folder = tmp_path / "broker"
    folder.mkdir()

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=test-ca")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj",
        "/CN=127.0.0.1")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.crt", "-days", "1", "-extfile", "san.ext")
    broker = Broker(folder, ["allow_anonymous true", f"cafile {folder}/ca.crt", f"certfile {folder}/server.crt",
                             f"keyfile {folder}/server.key"])
    try:
        url = parse_broker_url(f"mqtts://127.0.0.1:{broker.port}/plant")
        good = Publisher(PublisherConfig(url, device="b", spool_dir=tmp_path / "s", ca_file=str(folder / "ca.crt")))
        good.publish({"index": 0})
        assert good.connected.wait(10)
        assert good.close()["messages"] == 0  # delivered over TLS and acknowledged
        # Without the test CA the broker's certificate is not trusted: nothing is sent, the message stays.
        untrusted = Publisher(PublisherConfig(url, device="b", spool_dir=tmp_path / "s2", drain_s=1.5))
        untrusted.publish({"index": 0})
        assert untrusted.close()["messages"] == 1 and not untrusted.connected.is_set()
    finally:
        broker.stop()


def test_run_command_publishes_every_json_line_and_fleet_watch_records_them(
        broker: Broker, tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from click.testing import CliRunner

    from patchcore_edge.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for source in sorted((tiny_bundle.parent / "nominal").glob("*.png"))[:6]:
        shutil.copy(source, images / source.name)
    sub = Subscriber(broker.port, "plant/#")
    assert sub.subscribed.wait(5)
    url = f"mqtt://127.0.0.1:{broker.port}/plant"
    watched = tmp_path / "watch.jsonl"
    watcher = threading.Thread(target=lambda: CliRunner().invoke(
        main, ["fleet", "watch", url, "--jsonl", str(watched), "--duration", "6", "--interval", "1"]))
    watcher.start()
    time.sleep(1.0)
    out = tmp_path / "run.jsonl"
    result = CliRunner().invoke(main, ["run", str(tiny_bundle), str(images), "--backend", "onnxruntime",
                                       "--threads", "1", "--jsonl", str(out), "--publish", url,
                                       "--device-id", "line1-board", "--camera", "top",
                                       "--spool", str(tmp_path / "spool")])
    assert result.exit_code == 0, result.output
    local = [json.loads(line) for line in out.read_text().splitlines()]
    assert sub.wait(lambda m: len(results(m)) >= len(local))
    sent = results(sub.messages)
    assert len(sent) == len(local) == 6
    for mine, theirs in zip(local, sent):
        assert {k: theirs[k] for k in mine} == mine  # the JSON line's fields, unchanged
        assert theirs["device"] == "line1-board" and theirs["camera"] == "top" and len(theirs["bundle_id"]) == 12
    status = [json.loads(p) for t, p, _ in sub.messages if t == "plant/line1-board/status"]
    assert status[0]["state"] == "online" and status[0]["backend"].startswith("onnxruntime")
    watcher.join(timeout=20)
    recorded = [json.loads(line) for line in watched.read_text().splitlines()]
    assert sum(1 for r in recorded if r["topic"] == "plant/line1-board/top/result") == 6
    sub.close()


def test_fleet_view_rates_dedup_drift_and_silence() -> None:
    from patchcore_edge.fleet.watch import FleetView

    view = FleetView(silent_after=30)
    view.handle("p/b1/status", json.dumps({"state": "online", "nominal_quantiles":
                                           {"q25": 1.0, "q50": 1.5, "q75": 2.0}}).encode(), 0.0)
    for i in range(40):
        message = {"message_id": f"r-{i}", "score": 4.0 + 0.01 * i, "anomalous": i % 4 == 0}
        view.handle("p/b1/cam0/result", json.dumps(message).encode(), 10.0)
        view.handle("p/b1/cam0/result", json.dumps(message).encode(), 10.0)  # a resend: counted once
    row = view.render(20.0).splitlines()[1].split()
    assert row[:4] == ["b1", "online", "40", "25.0"] and "MOVED" in row
    assert view.render(100.0).splitlines()[1].split()[1] == "SILENT"
