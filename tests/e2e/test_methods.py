"""Direct methods with the official Python SDKs: the service's `invoke_device_method` reaches
the device's `on_method_request_received` handler and gets its answer; many calls to many
devices run at once and a silent device holds up nobody else; the error paths: a device not
connected or not subscribed (404103), no answer in time (504101), an unknown device (404, `ErrorCode:DeviceNotFound`),
bad timeouts (400)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from azure.iot.device import MethodResponse
from azure.iot.hub.models import CloudToDeviceMethod
from msrest.exceptions import HttpOperationError

from conftest import metric_sum_of, unique_id


def answer_with(client, status: int = 200, delay: float = 0.0, silent: bool = False) -> list:
    """Sets a method handler on `client` that answers `{"echo": payload, "method": name}` after
    `delay` (or never, if `silent`); returns the list of requests it saw."""
    seen: list = []

    def handler(req):
        seen.append((req.name, req.payload))
        if silent:
            return
        if delay:
            time.sleep(delay)
        client.send_method_response(MethodResponse.create_from_method_request(
            req, status, {"echo": req.payload, "method": req.name}))

    client.on_method_request_received = handler
    return seen


def invoke(rm, device_id: str, name: str, payload, response_timeout: int = 10, connect_timeout: int = 0):
    return rm.invoke_device_method(device_id, CloudToDeviceMethod(
        method_name=name, payload=payload, response_timeout_in_seconds=response_timeout,
        connect_timeout_in_seconds=connect_timeout))


def status_and_code(err: HttpOperationError) -> tuple[int, int | str]:
    """The status and IoT Hub error of a failed call: the numeric `errorCode` of the JSON form,
    or the name of the registry form `ErrorCode:<Name>;<message>` (what the Node SDK maps to
    typed errors)."""
    r = err.response
    message = r.json()["Message"]
    if message.startswith("ErrorCode:"):
        return r.status_code, message[len("ErrorCode:"):].split(";", 1)[0]
    return r.status_code, json.loads(message)["errorCode"]


def wait_subscribed(hub, rm, device_id: str, timeout: float = 10.0) -> None:
    """Setting the handler subscribes asynchronously: call until it stops being 404103."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            invoke(rm, device_id, "ping", None, response_timeout=5, connect_timeout=2)
            return
        except HttpOperationError as e:
            if status_and_code(e) != (404, 404103) or time.monotonic() > deadline:
                raise


def test_a_method_call_reaches_the_device_and_returns_its_answer(shared_hub):
    hub = shared_hub
    device_id = unique_id("meth")
    client = hub.connected_client(hub.create_device(device_id))
    rm = hub.registry_manager()
    # Connected but not subscribed: 404103 DeviceNotOnline.
    with pytest.raises(HttpOperationError) as err:
        invoke(rm, device_id, "reboot", {"delay": 1})
    assert status_and_code(err.value) == (404, 404103)
    assert err.value.response.headers.get("iothub-errorcode") == "DeviceNotOnline"

    seen = answer_with(client, status=201)
    wait_subscribed(hub, rm, device_id)
    result = invoke(rm, device_id, "reboot", {"delay": 1, "nested": {"a": [1, 2]}})
    assert result.status == 201
    assert result.payload == {"echo": {"delay": 1, "nested": {"a": [1, 2]}}, "method": "reboot"}
    assert ("reboot", {"delay": 1, "nested": {"a": [1, 2]}}) in seen
    # A string payload and no payload.
    assert invoke(rm, device_id, "say", "hello").payload["echo"] == "hello"
    # The SDK sends a payload of None as "" (iothub_registry_manager.invoke_device_method).
    assert invoke(rm, device_id, "nothing", None).payload == {"echo": "", "method": "nothing"}
    m = hub.control_metrics()
    assert metric_sum_of(m, "roost_control_method_calls_total", outcome="answered") >= 3
    assert metric_sum_of(m, "roost_control_method_calls_total", outcome="not_online") >= 1


def test_error_paths_of_a_method_call(shared_hub):
    hub = shared_hub
    rm = hub.registry_manager()
    with pytest.raises(HttpOperationError) as err:
        invoke(rm, unique_id("nobody"), "m", None)
    assert status_and_code(err.value) == (404, "DeviceNotFound")
    assert err.value.response.headers["iothub-errorcode"] == "DeviceNotFound"

    offline = unique_id("meth")
    hub.create_device(offline)
    t0 = time.monotonic()
    with pytest.raises(HttpOperationError) as err:
        invoke(rm, offline, "m", None, connect_timeout=2)
    assert status_and_code(err.value) == (404, 404103)
    waited = time.monotonic() - t0
    assert 1.5 <= waited < 5, f"connectTimeoutInSeconds=2 waited {waited:.1f} s"

    for bad in ({"response_timeout": 4}, {"response_timeout": 301}, {"connect_timeout": 301}):
        with pytest.raises(HttpOperationError) as err:
            invoke(rm, offline, "m", None, **bad)
        assert status_and_code(err.value) == (400, 400004), bad

    # A device that never answers: 504101 after responseTimeoutInSeconds.
    silent_id = unique_id("meth")
    silent = hub.connected_client(hub.create_device(silent_id))
    answer_with(silent, silent=True)
    t0 = time.monotonic()
    with pytest.raises(HttpOperationError) as err:
        # The first calls may still find it unsubscribed; connect_timeout covers that.
        invoke(rm, silent_id, "m", None, response_timeout=5, connect_timeout=5)
    assert status_and_code(err.value) == (504, 504101)
    assert time.monotonic() - t0 >= 5


def test_many_calls_at_once_and_a_silent_device_blocks_nobody(shared_hub):
    hub = shared_hub
    rm = hub.registry_manager()
    ids = [unique_id("meth") for _ in range(6)]
    clients = [hub.connected_client(hub.create_device(d)) for d in ids]
    for c in clients[:-1]:
        answer_with(c, delay=1.0)
    answer_with(clients[-1], silent=True)
    for d in ids[:-1]:
        wait_subscribed(hub, rm, d)

    def call(i: int):
        # One registry manager per thread: msrest's session is not shared across threads.
        return invoke(hub.registry_manager(), ids[i % 5], "work", {"i": i}, response_timeout=10)

    slow_outcome: list = []

    def call_silent() -> None:
        try:
            invoke(hub.registry_manager(), ids[-1], "work", None, response_timeout=10, connect_timeout=2)
            slow_outcome.append("answered")
        except HttpOperationError as e:
            slow_outcome.append(status_and_code(e))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            slow_outcome.append(repr(e))

    slow = threading.Thread(target=call_silent)
    slow.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(call, range(20)))
    elapsed = time.monotonic() - t0
    assert [r.payload["echo"]["i"] for r in results] == list(range(20))
    assert all(r.status == 200 for r in results)
    # 20 calls of 1 s each over 5 devices, at once: each device's SDK runs its handlers one at
    # a time (4 s per device), not 20 s in a row, and the silent device's call is still waiting.
    assert elapsed < 9, f"20 calls took {elapsed:.1f} s"
    assert slow.is_alive(), "the silent device's call waits for its own timeout"
    slow.join(timeout=30)
    assert slow_outcome == [(504, 504101)], slow_outcome
