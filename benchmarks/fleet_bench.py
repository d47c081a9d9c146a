"""Fleet numbers against a real Mosquitto on loopback: publish() cost per image, delivery latency, spool
throughput while the broker is down, catch-up time after an outage (scaled: OUTAGE messages, default 2400 = 2 min
at 20 images/s; the 10-minute outage is 12000). Usage: python benchmarks/fleet_bench.py [OUTAGE]"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mosquitto_broker import Broker  # noqa: E402

import paho.mqtt.client as mqtt  # noqa: E402

from patchcore_edge.fleet.publisher import Publisher, PublisherConfig  # noqa: E402
from patchcore_edge.fleet.spool import Spool  # noqa: E402
from patchcore_edge.fleet.url import parse_broker_url  # noqa: E402

RECORD = {"path": "/data/line1/part_000123.png", "index": 123, "width": 900, "height": 900, "score": 1.234,
          "normalised_score": 0.81, "anomalous": False, "defect_pixels": 0,
          "timing_ms": {"preprocess": 3.1, "features": 8.2, "search": 1.1, "score": 0.4}}


def main() -> None:
    outage = int(sys.argv[1]) if len(sys.argv) > 1 else 2400
    tmp = Path(tempfile.mkdtemp())
    broker = Broker(tmp / "broker")
    received: dict = {}
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub", clean_session=False)
    sub.on_connect = lambda c, *_: c.subscribe("bench/#", qos=1)
    sub.on_message = lambda _c, _u, m: received.setdefault(json.loads(m.payload).get("seq"), time.time())
    sub.reconnect_delay_set(1, 1)
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    time.sleep(0.5)
    url = parse_broker_url(f"mqtt://127.0.0.1:{broker.port}/bench")
    pub = Publisher(PublisherConfig(url, device="b", spool_dir=tmp / "spool"))
    time.sleep(0.5)
    costs, sent = [], {}
    for i in range(1, 401):  # 20 images/s, like a line camera
        t0 = time.perf_counter()
        pub.publish(RECORD)
        costs.append((time.perf_counter() - t0) * 1e6)
        sent[i] = time.time()
        time.sleep(0.05)
    time.sleep(1.0)
    latency = [1000 * (received[i] - sent[i]) for i in sent if i in received]
    pub.close()
    print(f"publish() per image: median {statistics.median(costs):.1f} us, p99 "
          f"{sorted(costs)[int(0.99 * len(costs))]:.1f} us (n={len(costs)})")
    print(f"delivery latency publish->subscriber: median {statistics.median(latency):.2f} ms, p95 "
          f"{sorted(latency)[int(0.95 * len(latency))]:.2f} ms ({len(latency)}/{len(sent)} received)")
    spool = Spool(tmp / "raw", 2**40)
    payload = json.dumps(RECORD).encode()
    t0 = time.perf_counter()
    for _ in range(50):
        spool.add([("result", "bench/b/cam0/result", payload)] * 20)
    rate = 1000 / (time.perf_counter() - t0)
    spool.close()
    print(f"spool writes (batches of 20, synchronous=FULL): {rate:.0f} messages/s")
    broker.stop()
    pub = Publisher(PublisherConfig(url, device="b", spool_dir=tmp / "spool2"))
    for _ in range(outage):
        pub.publish(RECORD)
    time.sleep(2.0)
    print(f"spooled during outage: {pub.spool.count} of {outage}")
    received.clear()
    broker.start()
    t0 = time.time()
    pub.connected.wait(30)
    while len(received) < outage and time.time() - t0 < 120:
        time.sleep(0.02)
    print(f"catch-up after broker restart: {outage} messages in {time.time() - t0:.2f} s "
          f"(includes up to ~2 s reconnect back-off; delivered {len(received)})")
    pub.close()
    sub.loop_stop()
    broker.stop()


if __name__ == "__main__":
    main()
