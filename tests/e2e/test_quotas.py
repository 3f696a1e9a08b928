"""Quotas and throttles (issue 7 §9, wire spec §8): a hub's quotas come from `roost control
--quota PRESET --limit NAME=VALUE`, reach the engine in the config epoch, and give IoT Hub's
behaviour when exceeded — a registry call answered 429 with 429001, a device over a send rate
slowed (traffic shaping) and closed only when the backlog would grow past its limit, a new
connection over the connection rate closed at accept. Nothing acknowledged is lost."""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests

from conftest import (
    is_acked,
    metric_sum_of,
    parse_connection_string,
    record_body,
    telemetry_of,
    telemetry_topic,
    wait_until,
)

DISCONNECTS = "roost_mqtt_disconnects_total"
DELAYED = "roost_throttle_delayed_total"


def start_with_limits(hub_factory, *limits: str):
    hub = hub_factory(start=False)
    for limit in limits:
        hub.control_args += ["--limit", limit]
    hub.start()
    # The quotas reach the engine in the config epoch; each shard puts it in force on its next
    # tick (100 ms).
    hub.wait_metric("roost_link_epochs_total", lambda v: v >= 1, ">= 1", result="applied")
    time.sleep(0.3)
    return hub


def test_registry_operations_over_the_quota_get_429001(hub_factory):
    hub = start_with_limits(hub_factory, "registry_ops_per_min=4", "throttle_backlog_ms=0")
    url = f"{hub.service_url}/devices/nobody?api-version=2021-04-12"

    def get() -> requests.Response:
        return requests.get(url, headers=hub.service_headers(), verify=hub.ca_path, timeout=10)

    # A minute's worth at once: a lookup of a missing device is an operation all the same.
    assert [get().status_code for _ in range(4)] == [404] * 4
    r = get()
    assert r.status_code == 429, r.text
    assert r.headers.get("iothub-errorcode") == "ThrottlingException"
    assert json.loads(r.json()["Message"])["errorCode"] == 429001
    # The service SDK sees the same 429.
    with pytest.raises(Exception) as raised:
        hub.registry_manager().get_device("nobody")
    response = getattr(raised.value, "response", None)
    assert response is not None and response.status_code == 429, repr(raised.value)
    # A request without a valid token is refused before it is metered: still 401, not 429.
    bad = requests.get(url, headers=hub.service_headers("SharedAccessSignature sr=x&sig=y&se=1&skn=iothubowner"),
                       verify=hub.ca_path, timeout=10)
    assert bad.status_code == 401
    refused = metric_sum_of(hub.control_metrics(), "roost_control_throttled_total",
                            quota="registry_ops_per_min", outcome="refused")
    assert refused >= 2, refused


def test_a_device_over_its_send_rate_is_slowed_not_dropped(hub_factory):
    hub = start_with_limits(hub_factory, "device_d2c_sends_per_sec=5")
    dev, device_id, _ = hub.new_raw_device("shaped")
    n = 15
    t0 = time.monotonic()
    # Pipelined: paho sends all 15 at once (in-flight window 20).
    infos = [dev.publish(telemetry_topic(device_id), f"m{i}".encode(), qos=1) for i in range(n)]
    for info in infos:
        wait_until(info.is_published, 15, "PUBACK of a shaped publish")
    elapsed = time.monotonic() - t0
    # A second's worth (5) at once, then 5 a second: the last of 15 after about 2 s.
    assert elapsed >= 1.7, f"15 messages at 5/s acknowledged in {elapsed:.2f} s"
    assert not dev.disconnected.is_set(), "a shaped device was closed"
    bodies = [record_body(r) for r in telemetry_of(hub.records(), device_id)]
    assert bodies == [f"m{i}".encode() for i in range(n)]
    delayed = hub.metric_sum(DELAYED, quota="device_d2c_sends_per_sec")
    assert delayed >= n - 6, delayed
    print(f"device send quota 5/s: {n} pipelined messages acknowledged over {elapsed:.2f} s, {delayed:.0f} delayed")


def test_the_hub_send_rate_closes_senders_past_the_backlog_and_loses_nothing(hub_factory):
    hub = start_with_limits(hub_factory, "d2c_sends_per_sec=4", "throttle_backlog_ms=1000")
    devices = [hub.new_raw_device(f"hubrate{i}") for i in range(8)]
    before = hub.metrics()
    sent = {}
    for dev, device_id, _ in devices:
        sent[device_id] = [(f"{device_id}-{i}".encode(), dev.publish(telemetry_topic(device_id),
                                                                      f"{device_id}-{i}".encode(), qos=1))
                           for i in range(3)]
    # 24 messages at once against 4/s with a 1 s backlog: some wait, the rest close their sender.
    hub.wait_metric(DISCONNECTS, lambda v: v >= metric_sum_of(before, DISCONNECTS, reason="throttled") + 1,
                    "a sender closed", reason="throttled")
    time.sleep(2.5)  # whatever was shaped is acknowledged by now
    acked = {d: [body for body, info in msgs if is_acked(info)] for d, msgs in sent.items()}
    total = sum(len(v) for v in acked.values())
    assert 0 < total < 24, f"{total} of 24 acknowledged"
    assert hub.metric_sum(DELAYED, quota="d2c_sends_per_sec") >= 1
    records = hub.records()
    for device_id, bodies in acked.items():
        stored = [record_body(r) for r in telemetry_of(records, device_id)]
        for body in bodies:
            assert body in stored, f"acknowledged {body!r} is not in the log"
    print(f"hub send quota 4/s, backlog 1 s: {total} of 24 acknowledged (all stored), "
          f"{sum(d[0].disconnected.is_set() for d in devices)} of 8 senders closed")


def _closed_at_once(s: socket.socket) -> bool:
    s.settimeout(0.5)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def test_new_connections_over_the_rate_are_closed_at_accept(hub_factory):
    hub = start_with_limits(hub_factory, "new_connections_per_sec=4")
    device_id = "conn-rate"
    key = parse_connection_string(hub.create_device(device_id))["SharedAccessKey"]
    time.sleep(1.5)  # the bucket is full
    before = hub.metrics()
    socks = [socket.create_connection(("127.0.0.1", hub.mqtt_port), timeout=5) for _ in range(20)]
    try:
        closed = sum(_closed_at_once(s) for s in socks)
    finally:
        for s in socks:
            s.close()
    assert 10 <= closed < 20, f"{closed} of 20 closed at accept"
    hub.wait_metric(DISCONNECTS, lambda v: v >= metric_sum_of(before, DISCONNECTS, reason="connect_throttled") + closed,
                    f"+{closed}", reason="connect_throttled")
    time.sleep(1.5)  # the rate refills: a device connects as usual
    dev = hub.raw_connected_device(device_id, key)
    info = dev.publish(telemetry_topic(device_id), b"after the burst", qos=1)
    wait_until(info.is_published, 10, "PUBACK")


def test_a_lower_message_size_limit_closes_a_larger_publish(hub_factory):
    hub = start_with_limits(hub_factory, "d2c_max_bytes=1024")
    dev, device_id, _ = hub.new_raw_device("small")
    before = hub.metrics()
    ok = dev.publish(telemetry_topic(device_id), b"x" * 1024, qos=1)
    wait_until(ok.is_published, 10, "PUBACK at the limit")
    dev.publish(telemetry_topic(device_id), b"y" * 1025, qos=1)
    dev.wait_disconnected(timeout=10)
    hub.wait_metric(DISCONNECTS, lambda v: v >= metric_sum_of(before, DISCONNECTS, reason="payload_too_large") + 1,
                    "+1", reason="payload_too_large")
    assert [record_body(r) for r in telemetry_of(hub.records(), device_id)] == [b"x" * 1024]
