"""Quotas and throttles (issue 7 §9, wire spec §8): a hub's quotas come from `roost control
--quota PRESET --limit NAME=VALUE`, reach the engine in the config epoch, and give IoT Hub's
behaviour when exceeded — a registry call answered 429 with 429001, a device over a send rate
slowed (traffic shaping) and closed only when the backlog would grow past its limit, a new
connection over the connection rate closed at accept. Nothing acknowledged is lost.

The service API's operation quotas (twin reads and updates, cloud-to-device sends, queries, jobs
operations, direct-method bytes in 4 KB units) are held within the shaping backlog and then
answered 429 with 429001 in IoT Hub's form; a device's twin requests over the twin rates are
answered 429 on `$iothub/twin/res/429/`. Most of these tests set `throttle_backlog_ms=0`, so
that a call over the rate is refused at once rather than after a wait that depends on timing:
they assert that a call within the rate passes and that at least one of a few quick calls past
it is refused, never an exact count that a slow machine could change."""

from __future__ import annotations

import json
import queue
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import (
    is_acked,
    metric_sum_of,
    parse_connection_string,
    record_body,
    telemetry_of,
    telemetry_topic,
    unique_id,
    wait_until,
)

DISCONNECTS = "roost_disconnects_total"
DELAYED = "roost_throttle_delayed_total"
THROTTLED = "roost_control_throttled_total"
API = "api-version=2021-04-12"
BAD_TOKEN = "SharedAccessSignature sr=x&sig=y&se=1&skn=iothubowner"


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


# --------------------------------------------------------------------------------------------
# The service API's operation quotas, and a device's twin requests


def service_call(hub, method: str, path: str, token: str | None = None,
                 session: requests.Session | None = None, **kwargs) -> requests.Response:
    """One service API request signed with the owner policy (or `token`)."""
    return (session or requests).request(method, f"{hub.service_url}{path}?{API}", headers=hub.service_headers(token),
                                         verify=hub.ca_path, timeout=15, **kwargs)


def assert_throttled(r: requests.Response) -> None:
    """IoT Hub's answer past a service quota: 429, `iothub-errorcode: ThrottlingException` and
    429001 in the JSON error body."""
    assert r.status_code == 429, f"{r.status_code} {r.text}"
    assert r.headers.get("iothub-errorcode") == "ThrottlingException", dict(r.headers)
    assert json.loads(r.json()["Message"])["errorCode"] == 429001, r.text


def throttled(hub, quota: str, outcome: str = "refused") -> float:
    return metric_sum_of(hub.control_metrics(), THROTTLED, quota=quota, outcome=outcome)


def assert_bad_token_not_metered(hub, quota: str, method: str, path: str, **kwargs) -> None:
    """With the quota spent, a request without a valid token is still 401, not 429: it is
    refused before it is metered, and not counted."""
    before = throttled(hub, quota)
    r = service_call(hub, method, path, token=BAD_TOKEN, **kwargs)
    assert r.status_code == 401, f"{r.status_code} {r.text}"
    assert throttled(hub, quota) == before


def sdk_status(call) -> int:
    """The HTTP status of a service SDK call that must fail."""
    with pytest.raises(Exception) as raised:
        call()
    response = getattr(raised.value, "response", None)
    assert response is not None, repr(raised.value)
    return response.status_code


def test_twin_reads_over_the_quota_are_held_then_get_429001(hub_factory):
    hub = start_with_limits(hub_factory, "twin_reads_per_sec=2", "throttle_backlog_ms=1000")
    device_id = unique_id("twinread")
    hub.create_device(device_id)

    def read(_: int) -> tuple[requests.Response, float]:
        t0 = time.monotonic()
        r = service_call(hub, "GET", f"/twins/{device_id}")
        return r, time.monotonic() - t0

    n = 12
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(read, range(n)))
    statuses = [r.status_code for r, _ in results]
    assert set(statuses) <= {200, 429}, statuses
    answered = [t for r, t in results if r.status_code == 200]
    refused = [r for r, _ in results if r.status_code == 429]
    # Two at once (a second's worth), up to two more held within the 1 s backlog (and what
    # refills while the 12 arrive), the rest refused.
    assert len(answered) >= 2 and refused, statuses
    for r in refused:
        assert_throttled(r)
    assert all(r.json()["deviceId"] == device_id for r, _ in results if r.status_code == 200)
    assert throttled(hub, "twin_reads_per_sec", "delayed") >= 1
    assert throttled(hub, "twin_reads_per_sec") == len(refused)
    assert_bad_token_not_metered(hub, "twin_reads_per_sec", "GET", f"/twins/{device_id}")
    print(f"twin reads 2/s, backlog 1 s: {n} at once, {len(answered)} answered "
          f"(the last after {max(answered):.2f} s), {len(refused)} refused with 429001")


def test_twin_updates_over_the_quota_get_429001_and_change_nothing(hub_factory):
    hub = start_with_limits(hub_factory, "twin_updates_per_sec=1", "throttle_backlog_ms=0")
    device_id = unique_id("twinupdate")
    hub.create_device(device_id)
    statuses = []
    with requests.Session() as s:
        for i in range(8):
            r = service_call(hub, "PATCH", f"/twins/{device_id}", session=s, json={"tags": {"n": i}})
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert_throttled(r)
    # The first takes the full bucket; at 1/s at least one of 8 quick calls is over it.
    assert statuses[0] == 200 and 429 in statuses and set(statuses) <= {200, 429}, statuses
    last = max(i for i, st in enumerate(statuses) if st == 200)
    twin = service_call(hub, "GET", f"/twins/{device_id}").json()
    assert twin["tags"] == {"n": last}, (twin["tags"], statuses)
    assert throttled(hub, "twin_updates_per_sec") == statuses.count(429)
    print(f"twin updates 1/s, no backlog: 8 quick PATCHes, {statuses.count(200)} applied, "
          f"{statuses.count(429)} refused with 429001")


def test_cloud_to_device_sends_over_the_quota_get_429001(hub_factory):
    # Regression: `c2d_sends_per_min` had no bucket in control, so no send was ever refused.
    hub = start_with_limits(hub_factory, "c2d_sends_per_min=3", "throttle_backlog_ms=0")
    device_id = unique_id("c2dquota")
    hub.create_device(device_id)
    path = f"/devices/{device_id}/messages/deviceBound"
    assert [service_call(hub, "POST", path, data=f"m{i}".encode()).status_code for i in range(3)] == [204] * 3
    assert_throttled(service_call(hub, "POST", path, data=b"m3"))
    # The refused message is not queued for the device.
    assert hub.show_device(device_id)["cloudToDeviceMessageCount"] == 3
    assert_bad_token_not_metered(hub, "c2d_sends_per_min", "POST", path, data=b"m4")
    assert throttled(hub, "c2d_sends_per_min") == 1


def test_queries_over_the_quota_get_429001(hub_factory):
    from azure.iot.hub.models import QuerySpecification

    hub = start_with_limits(hub_factory, "queries_per_min=2", "throttle_backlog_ms=0")
    query = {"query": "SELECT * FROM devices"}
    assert [service_call(hub, "POST", "/devices/query", json=query).status_code for _ in range(2)] == [200, 200]
    assert_throttled(service_call(hub, "POST", "/devices/query", json=query))
    # The service SDK sees the same 429.
    rm = hub.registry_manager()
    assert sdk_status(lambda: rm.query_iot_hub(QuerySpecification(query=query["query"]))) == 429
    assert_bad_token_not_metered(hub, "queries_per_min", "POST", "/devices/query", json=query)
    assert throttled(hub, "queries_per_min") == 2


def test_job_operations_over_the_quota_get_429001(hub_factory):
    import datetime

    from azure.iot.hub.models import JobRequest, Twin

    hub = start_with_limits(hub_factory, "jobs_ops_per_min=3", "throttle_backlog_ms=0")
    jm = hub.job_manager()
    job_id = unique_id("later")
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1)
    # Create, get and cancel: the minute's three operations.
    jm.create_scheduled_job(job_id, JobRequest(job_id=job_id, type="scheduleUpdateTwin", start_time=later,
                                               max_execution_time_in_seconds=60, query_condition="*",
                                               update_twin=Twin(tags={"never": True})))
    assert jm.get_scheduled_job(job_id).status == "scheduled"
    assert jm.cancel_scheduled_job(job_id).status == "cancelled"
    assert_throttled(service_call(hub, "GET", "/jobs/v2/query"))
    assert sdk_status(lambda: jm.get_scheduled_job(job_id)) == 429
    assert_bad_token_not_metered(hub, "jobs_ops_per_min", "GET", f"/jobs/v2/{job_id}")
    assert throttled(hub, "jobs_ops_per_min") == 2


def test_method_calls_are_metered_in_4_kb_units(hub_factory):
    from azure.iot.hub.models import CloudToDeviceMethod

    hub = start_with_limits(hub_factory, "method_bytes_per_sec=4096", "throttle_backlog_ms=0")
    device_id = unique_id("methodquota")
    hub.create_device(device_id)  # not connected: a call past the meter is answered 404103
    path = f"/twins/{device_id}/methods"

    def call(payload: str) -> requests.Response:
        return service_call(hub, "POST", path, json={"methodName": "m", "payload": payload,
                                                     "responseTimeoutInSeconds": 5, "connectTimeoutInSeconds": 0})

    # A call of 5 KB is two 4 KB units, more than a second's worth at 4096 B/s: refused even
    # with the bucket full, by REST and through the service SDK.
    assert_throttled(call("x" * 5000))
    rm = hub.registry_manager()
    big = CloudToDeviceMethod(method_name="m", payload="x" * 5000, response_timeout_in_seconds=5,
                              connect_timeout_in_seconds=0)
    assert sdk_status(lambda: rm.invoke_device_method(device_id, big)) == 429
    # A refusal charges nothing: a small call (one unit) passes the meter and finds the device
    # offline.
    r = call("small")
    assert r.status_code == 404 and json.loads(r.json()["Message"])["errorCode"] == 404103, r.text
    # One unit a second: at least one of a few quick small calls is over it.
    statuses = []
    for _ in range(6):
        r = call("small")
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert_throttled(r)
    assert 429 in statuses and set(statuses) <= {404, 429}, statuses
    assert throttled(hub, "method_bytes_per_sec") == 2 + statuses.count(429)


def test_a_devices_twin_requests_over_the_twin_rates_are_answered_429(hub_factory):
    hub = start_with_limits(hub_factory, "twin_reads_per_sec=1", "twin_updates_per_sec=1",
                            "throttle_backlog_ms=0")
    dev, device_id, _ = hub.new_raw_device("twinrate")
    answers = dev.subscribe_collect("$iothub/twin/res/#")
    before = hub.metric_sum("roost_twin_requests_total", result="throttled")

    def burst(requests_: list[tuple[str, str, bytes]]) -> dict[str, tuple[int, str, bytes]]:
        """Publishes (rid, topic, payload) at once; returns rid -> (status, topic, body)."""
        for _, topic, payload in requests_:
            dev.publish(topic, payload)
        got: dict[str, tuple[int, str, bytes]] = {}
        deadline = time.monotonic() + 10
        while len(got) < len(requests_) and time.monotonic() < deadline:
            try:
                topic, body = answers.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            rid = topic.split("$rid=")[1].split("&")[0]
            got[rid] = (int(topic.split("/")[3]), topic, body)
        assert set(got) == {rid for rid, _, _ in requests_}, got
        return got

    def assert_refusals(got: dict, ok: int, first: str) -> int:
        statuses = {rid: v[0] for rid, v in got.items()}
        # The first takes the shard's full bucket; the rest come within milliseconds.
        assert statuses[first] == ok and 429 in statuses.values(), statuses
        assert set(statuses.values()) <= {ok, 429}, statuses
        for rid, (status, topic, body) in got.items():
            if status == 429:
                assert topic == f"$iothub/twin/res/429/?$rid={rid}", topic
                assert json.loads(body)["errorCode"] == 429001, body
        return list(statuses.values()).count(429)

    n = 6
    gets = burst([(f"g{i}", f"$iothub/twin/GET/?$rid=g{i}", b"") for i in range(n)])
    refused = assert_refusals(gets, 200, "g0")
    patches = burst([(f"p{i}", f"$iothub/twin/PATCH/properties/reported/?$rid=p{i}", json.dumps({"n": i}).encode())
                     for i in range(n)])
    refused += assert_refusals(patches, 204, "p0")
    assert dev.connected, "a throttled twin request closed the connection"
    # A refused patch changed nothing: the reported section holds the accepted ones only.
    applied = sorted(int(rid[1:]) for rid, v in patches.items() if v[0] == 204)
    reported = service_call(hub, "GET", f"/twins/{device_id}").json()["properties"]["reported"]
    assert (reported["n"], reported["$version"]) == (applied[-1], 1 + len(applied)), (reported, applied)
    got = hub.wait_metric("roost_twin_requests_total", lambda v: v >= before + refused, f">= {before + refused}",
                          result="throttled")
    assert got == before + refused
    print(f"device twin requests at 1/s (per shard: 0.5/s), no backlog: {n} GETs and {n} reported "
          f"PATCHes at once, {refused} answered 429 with 429001, the connection kept")
