"""Durability under SIGKILL with a checker (issue 7 §5): devices stamp `device|epoch|seq` into
each QoS 1 message; the engine is killed with SIGKILL at a random moment of every epoch and
restarted; afterwards a checker reads the whole log back and reports acknowledged messages
lost (must be 0), per-device reordering within an epoch (must be 0) and duplicates.

`test_crash.py` runs a few cycles in `make test`; the full run is this file as a script:

    ROOST_BIN=target/release/roost .venv/bin/python tests/e2e/kill_cycles.py --cycles 100

which prints one summary line (the figure in docs/reliability.md).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import STATE_TIMEOUT, Hub, RawMqttDevice, record_body, telemetry_topic

INFLIGHT = 20


@dataclass
class Tally:
    acked: set = field(default_factory=set)  # (device, epoch, seq) the hub acknowledged
    published: int = 0
    kills: int = 0


def publish_epoch(hub: Hub, device_id: str, key: str, epoch: int, stop: threading.Event, tally: Tally,
                  lock: threading.Lock) -> None:
    """Connect (retrying while the engine restarts) and stream stamped QoS 1 publishes until
    the connection ends or `stop` is set; record what was acknowledged."""
    deadline = time.monotonic() + STATE_TIMEOUT
    while True:
        dev = RawMqttDevice(hub.mqtt_port, hub.ca_pem, device_id, key, hostname=hub.hostname,
                            max_inflight=INFLIGHT)
        try:
            dev.connect(timeout=10)
            break
        except Exception:  # noqa: BLE001 - the engine may still be starting
            dev.close()
            if time.monotonic() > deadline or stop.is_set():
                return
            time.sleep(0.2)
    mid_to_seq: dict[int, int] = {}
    seq = 0
    try:
        while not stop.is_set() and not dev.disconnected.is_set():
            if seq - len(dev.acked_mids) < 2 * INFLIGHT:
                info = dev.publish(telemetry_topic(device_id), f"{device_id}|{epoch}|{seq}".encode(), qos=1)
                mid_to_seq[info.mid] = seq
                seq += 1
            else:
                time.sleep(0.001)
        dev.wait_disconnected(timeout=15)
    finally:
        acked = {(device_id, epoch, mid_to_seq[m]) for m in list(dev.acked_mids) if m in mid_to_seq}
        dev.close()
        with lock:
            tally.acked |= acked
            tally.published += seq


def run_cycles(hub: Hub, cycles: int, devices: int, seed: int = 7) -> dict:
    """`cycles` epochs of `devices` publishers, each ended by SIGKILL of the engine; returns the
    checker's figures."""
    rng = random.Random(seed)
    ids = []
    for i in range(devices):
        device_id = f"kill-{seed}-{i}"
        key = hub.create_device(device_id).rsplit("SharedAccessKey=", 1)[1]
        ids.append((device_id, key))
    tally, lock = Tally(), threading.Lock()
    for epoch in range(cycles):
        stop = threading.Event()
        threads = [threading.Thread(target=publish_epoch, args=(hub, d, k, epoch, stop, tally, lock), daemon=True)
                   for d, k in ids]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.5, 2.0))
        hub.kill_engine()
        tally.kills += 1
        stop.set()
        for t in threads:
            t.join(timeout=30)
        hub.start_engine()
    return check(hub, tally)


def check(hub: Hub, tally: Tally) -> dict:
    """Reads the log back: what was acknowledged and is missing, reordered or duplicated."""
    seen: dict[tuple, int] = {}
    last: dict[tuple, tuple] = {}  # (device, epoch) -> (partition, seq) of the latest record
    reordered = 0
    for r in hub.records():
        body = record_body(r).decode(errors="replace")
        parts = body.split("|")
        if len(parts) != 3 or not parts[0].startswith("kill-"):
            continue
        stamp = (parts[0], int(parts[1]), int(parts[2]))
        seen[stamp] = seen.get(stamp, 0) + 1
        key = stamp[:2]
        prev = last.get(key)
        if prev is not None and prev[0] == r["partition"] and stamp[2] <= prev[1]:
            reordered += 1
        last[key] = (r["partition"], stamp[2])
    lost = sorted(tally.acked - seen.keys())
    return {
        "kills": tally.kills,
        "published": tally.published,
        "acked": len(tally.acked),
        "stored": len(seen),
        "lost": len(lost),
        "lost_examples": lost[:10],
        "reordered": reordered,
        "duplicates": sum(n - 1 for n in seen.values() if n > 1),
    }


def summary(r: dict) -> str:
    return (f"kill -9 cycles: {r['kills']}, published {r['published']}, acknowledged {r['acked']}, "
            f"stored {r['stored']}, lost {r['lost']}, reordered {r['reordered']}, duplicates {r['duplicates']}")


def main() -> int:
    import os

    from conftest import roost_bin

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="roost-kill-") as root:
        hub = Hub(Path(root), Path(os.environ.get("ROOST_BIN") or roost_bin()))
        try:
            hub.start()
            r = run_cycles(hub, a.cycles, a.devices, a.seed)
        finally:
            hub.close()
    print(summary(r))
    return 0 if r["lost"] == 0 and r["reordered"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
