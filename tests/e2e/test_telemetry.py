"""Device-to-cloud telemetry with the official Python device SDK, read back through the engine's
consumer API (all partitions), `roost events tail`, and a consumer group with checkpoints."""

from __future__ import annotations

import base64
import json
import re
import time
from datetime import datetime, timezone

from azure.iot.device import Message

from conftest import (
    ENGINE_CORES,
    call_with_timeout,
    metric_sum_of,
    record_body,
    shutdown_client,
    telemetry_of,
    unique_id,
    wait_until,
)

# Custom properties exercising URL-encoding of the property bag (space, `/`, `=`, `&`, non-ASCII).
CUSTOM = {"space key": "a b/c=d&e", "unit": "°C", "plain": "1"}
BINARY = bytes(range(256))[::-1]  # starts with 0xff: not UTF-8


def parse_time(value) -> float:
    """ISO-8601 (`2026-11-26T05:00:00.123Z`, any number of fraction digits) or epoch
    milliseconds → epoch seconds."""
    if isinstance(value, (int, float)):
        return value / 1000.0
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)", value)
    assert m, f"not an ISO-8601 UTC timestamp: {value!r}"
    base, frac, tz = m.groups()
    dt = datetime.fromisoformat(base + ("+00:00" if tz == "Z" else tz))
    return dt.replace(tzinfo=dt.tzinfo or timezone.utc).timestamp() + float("0." + (frac or "0"))


def json_message(i: int) -> tuple[Message, dict]:
    body = json.dumps({"i": i, "temperature": 20.5 + i})
    msg = Message(body, message_id=f"mid-{i}", content_encoding="utf-8", content_type="application/json")
    msg.correlation_id = f"cid-{i}"
    msg.custom_properties = dict(CUSTOM, seq=str(i))
    expect = {
        "body": body.encode(),
        "encoding": "utf-8",
        "system": {"message-id": f"mid-{i}", "correlation-id": f"cid-{i}",
                   "content-type": "application/json", "content-encoding": "utf-8"},
        "properties": dict(CUSTOM, seq=str(i)),
    }
    return msg, expect


def binary_message() -> tuple[Message, dict]:
    msg = Message(BINARY)
    msg.custom_properties = {"kind": "binary"}
    return msg, {"body": BINARY, "encoding": "base64", "system": {}, "properties": {"kind": "binary"}}


def check_record(rec: dict, expect: dict, device_id: str, t_min: float, t_max: float) -> None:
    assert rec["bodyEncoding"] == expect["encoding"], rec
    assert record_body(rec) == expect["body"], rec
    if expect["encoding"] == "utf-8":
        assert rec["body"] == expect["body"].decode(), rec
    else:
        assert base64.b64decode(rec["body"]) == expect["body"], rec

    sp = rec["systemProperties"]
    for k, v in expect["system"].items():
        assert sp.get(k) == v, f"systemProperties[{k!r}] = {sp.get(k)!r}, want {v!r}: {rec}"
    # Absent system properties are omitted, not null.
    for k in ("message-id", "correlation-id", "content-type", "content-encoding", "user-id"):
        if k not in expect["system"]:
            assert k not in sp, f"{k} should be absent: {rec}"
    assert sp["iothub-connection-device-id"] == device_id
    assert sp["iothub-message-source"] == "Telemetry"
    assert "iothub-connection-auth-method" in sp, rec
    enq = parse_time(sp["iothub-enqueuedtime"])
    assert t_min - 2 <= enq <= t_max + 2, f"iothub-enqueuedtime {sp['iothub-enqueuedtime']} not near now"
    assert t_min - 2 <= parse_time(rec["enqueuedTime"]) <= t_max + 2, rec

    # App properties are exactly the custom ones: decoded, and no `$.` system keys leaking in.
    assert rec.get("properties", {}) == expect["properties"], rec


def test_telemetry_round_trip(hub):
    device_id = unique_id("tele")
    conn_str = hub.create_device(device_id)
    rm = hub.registry_manager()
    assert hub.connection_state(rm, device_id) == "Disconnected"

    before = hub.metrics()
    client = hub.connected_client(conn_str)
    assert client.connected
    hub.wait_connection_state(rm, device_id, "Connected")
    assert hub.show_device(device_id)["connectionState"] == "Connected"
    hub.wait_metric("roost_connections_current", lambda v: v == 1, "== 1")
    hub.wait_metric("roost_connections_accepted_total",
                    lambda v: v >= hub_sum(before, "roost_connections_accepted_total") + 1, "+1")

    # ---- send: four JSON messages with every system property, then a binary one
    t_min = time.time()
    expected = []
    for i in range(4):
        msg, exp = json_message(i)
        call_with_timeout(client.send_message, msg, what=f"send_message {i}")
        expected.append(exp)
    msg, exp = binary_message()
    call_with_timeout(client.send_message, msg, what="send_message binary")
    expected.append(exp)
    t_max = time.time()

    # ---- read back across all partitions (PUBACK means durable, so they are there now)
    parts = hub.partitions()
    assert sorted(p["partition"] for p in parts) == list(range(ENGINE_CORES)), parts
    assert all(p["first"] <= p["next"] for p in parts), parts
    mine = telemetry_of(hub.records(), device_id)
    assert len(mine) == len(expected), f"want {len(expected)} records for {device_id}, got {mine}"
    # One device's messages sit in one partition, in send order.
    assert len({r["partition"] for r in mine}) == 1, mine
    offsets = [r["offset"] for r in mine]
    assert offsets == sorted(set(offsets)), offsets
    for rec, exp in zip(mine, expected):
        check_record(rec, exp, device_id, t_min, t_max)
    # The per-partition read with from/max pages correctly.
    p = mine[0]["partition"]
    page = hub.partition_records(p, mine[0]["offset"], 2)
    assert [r["offset"] for r in page["records"]] == offsets[:2], page
    assert page["next"] == offsets[1] + 1, page

    # ---- `roost events tail --json` prints the same records
    tailed = telemetry_of(hub.tail_events("--from", "earliest", "--max", "100"), device_id)
    assert [record_body(r) for r in tailed] == [e["body"] for e in expected], tailed
    assert [r["systemProperties"].get("message-id") for r in tailed] == \
           [e["system"].get("message-id") for e in expected]
    assert len(hub.tail_events("--from", "earliest", "--max", "2")) == 2

    # ---- a consumer group reads, checkpoints, and then sees nothing new
    group = "e2e-readers"
    first = hub.group_records(group, max_=100, from_="earliest")
    got = telemetry_of(first["records"], device_id)
    assert [record_body(r) for r in got] == [e["body"] for e in expected], first
    positions = first["positions"]
    # The hub's own events (other devices' connection state, routed to `events` by the default
    # routes.lua) may follow in the same partition.
    assert positions.get(str(p)) >= offsets[-1] + 1, positions
    hub.checkpoint(group, positions)
    second = hub.group_records(group, max_=100, from_="earliest")
    assert telemetry_of(second["records"], device_id) == [], second
    assert all(r["systemProperties"]["iothub-message-source"] != "Telemetry" for r in second["records"]), second
    # A new message after the checkpoint is the only thing the group sees next.
    last, last_exp = json_message(99)
    call_with_timeout(client.send_message, last, what="send_message after checkpoint")
    third = hub.group_records(group, max_=100, from_="earliest")
    got = telemetry_of(third["records"], device_id)
    assert [record_body(r) for r in got] == [last_exp["body"]], third
    assert [r for r in third["records"] if r["systemProperties"]["iothub-message-source"] == "Telemetry"] == got
    sent = len(expected) + 1

    # ---- metrics counted the messages and the log appends
    hub.wait_metric("roost_messages_in_total",
                    lambda v: v == hub_sum(before, "roost_messages_in_total", protocol="mqtt") + sent,
                    f"+{sent}", protocol="mqtt")
    body_bytes = sum(len(e["body"]) for e in expected) + len(last_exp["body"])
    after = hub.metrics()
    assert delta(after, before, "roost_messages_in_bytes_total", protocol="mqtt") >= body_bytes
    assert delta(after, before, "roost_log_appends_total") >= sent
    assert delta(after, before, "roost_log_append_latency_seconds_count") >= 1
    in_series = [ls for (n, ls) in after if n == "roost_messages_in_total"]
    assert in_series and all(any(k == "shard" for k, _ in ls) for ls in in_series), \
        f"per-shard series carry a shard label: {in_series}"

    # ---- disconnect: connectionState and the gauge follow
    shutdown_client(client)
    hub.wait_connection_state(rm, device_id, "Disconnected")
    hub.wait_metric("roost_connections_current", lambda v: v == 0, "== 0")
    hub.wait_metric("roost_disconnects_total",
                    lambda v: v >= hub_sum(before, "roost_disconnects_total", reason="client_disconnect") + 1,
                    "+1", reason="client_disconnect")
    wait_until(lambda: hub.show_device(device_id)["connectionState"] == "Disconnected", 5,
               "`roost device show` connectionState Disconnected")


def hub_sum(metrics: dict, name: str, **labels: str) -> float:
    return metric_sum_of(metrics, name, **labels)


def delta(after: dict, before: dict, name: str, **labels: str) -> float:
    return metric_sum_of(after, name, **labels) - metric_sum_of(before, name, **labels)
