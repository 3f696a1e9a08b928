"""An acknowledged QoS 1 message survives `kill -9` of the engine (PUBACK only after a durable
append; DESIGN.md §2 "One durable append per message")."""

from __future__ import annotations

import time

from conftest import record_body, telemetry_of, telemetry_topic, wait_until

TOTAL = 3000  # messages the publisher would send
KILL_AFTER = 1000  # PUBACKs seen before the engine is killed
INFLIGHT = 100


def payload(seq: int) -> bytes:
    return f"crash-test payload {seq}".encode()


def test_acked_messages_survive_engine_sigkill(hub):
    dev, device_id, key = hub.new_raw_device("crash", max_inflight=INFLIGHT)

    # Stream QoS 1 publishes with seq=N in the property bag, keeping at most 2 * INFLIGHT
    # unacknowledged (INFLIGHT on the wire, the rest queued in paho), and kill -9 the engine as
    # soon as KILL_AFTER are acknowledged, so the kill lands in the middle of the stream.
    mid_to_seq: dict[int, int] = {}
    published = 0
    deadline = time.monotonic() + 60
    while len(dev.acked_mids) < KILL_AFTER:
        if published < TOTAL and published - len(dev.acked_mids) < 2 * INFLIGHT:
            info = dev.publish(telemetry_topic(device_id, {"seq": str(published)}), payload(published), qos=1)
            mid_to_seq[info.mid] = published
            published += 1
        else:
            assert not dev.disconnected.is_set(), "the hub closed the connection during the stream"
            assert time.monotonic() < deadline, f"only {len(dev.acked_mids)} PUBACKs after 60 s"
            time.sleep(0.0005)
    acked_at_kill = len(dev.acked_mids)
    hub.kill_engine()
    dev.wait_disconnected(timeout=10)
    dev.close()

    assert all(m in mid_to_seq for m in dev.acked_mids), "PUBACK for a packet id never published"
    acked = {mid_to_seq[m] for m in dev.acked_mids}
    assert len(acked) >= KILL_AFTER, "some messages were acknowledged before the kill"
    print(f"published {published}, acked {len(acked)} ({acked_at_kill} when the kill was sent)")

    # Restart the engine on the same data dir and ports; every acknowledged seq is there.
    hub.start_engine()
    records = telemetry_of(hub.records(), device_id)
    stored: dict[int, bytes] = {}
    for r in records:
        seq = int(r["properties"]["seq"])
        assert 0 <= seq < published, f"record with a seq never published: {r}"
        assert record_body(r) == payload(seq), f"corrupt record for seq {seq}: {r}"
        stored[seq] = record_body(r)
    missing = sorted(acked - stored.keys())
    assert not missing, f"{len(missing)} acknowledged messages lost after kill -9, e.g. {missing[:20]}"

    # The recovered engine keeps appending after the recovered records (nothing overwritten).
    next_before = {p["partition"]: p["next"] for p in hub.partitions()}
    dev2 = hub.raw_connected_device(device_id, key)
    info = dev2.publish(telemetry_topic(device_id, {"seq": "after-restart"}), b"after restart", qos=1)
    wait_until(info.is_published, 10, "PUBACK after the restart")
    after = telemetry_of(hub.records(), device_id)
    new = [r for r in after if r["properties"].get("seq") == "after-restart"]
    assert len(new) == 1, new
    assert new[0]["offset"] >= next_before[new[0]["partition"]], (new[0], next_before)
    assert len(after) == len(records) + 1
    hub.wait_metric("roost_messages_in_total", lambda v: v >= 1, ">= 1 on the restarted engine", protocol="mqtt")


def test_kill_cycles_with_a_checker_lose_nothing(hub):
    """A few cycles of `kill_cycles.py` (the full run, 100 cycles, is that file as a script):
    devices stamp device|epoch|seq, the engine is killed at a random moment of each epoch, and
    the checker finds every acknowledged message, in order."""
    from kill_cycles import run_cycles, summary

    r = run_cycles(hub, cycles=3, devices=4)
    print(summary(r))
    assert r["acked"] > 0, "nothing was acknowledged: the cycles tested nothing"
    assert r["lost"] == 0, f"acknowledged messages lost: {r['lost_examples']}"
    assert r["reordered"] == 0
