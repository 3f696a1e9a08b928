"""Persistent sessions (spec §0 rule 2, §2.3): with CleanSession=0 a client's subscriptions
outlive its connection — the Python SDK reconnects without subscribing again, after a dropped
connection or an engine restart, and still gets its methods and desired patches; CONNACK's
session-present says whether a session was resumed; CleanSession=1 starts empty."""

from __future__ import annotations

import queue
import time

import pytest
from azure.iot.hub.models import Twin, TwinProperties
from msrest.exceptions import HttpOperationError

from conftest import metric_sum_of, parse_connection_string, unique_id, wait_until
from test_methods import answer_with, invoke, status_and_code, wait_subscribed


def test_the_sdk_keeps_its_methods_and_desired_patches_across_an_engine_restart(hub):
    device_id = unique_id("sess")
    client = hub.connected_client(hub.create_device(device_id), connection_retry=True)
    rm = hub.registry_manager()
    seen = answer_with(client)
    patches: queue.Queue = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put
    wait_subscribed(hub, rm, device_id)
    assert invoke(rm, device_id, "before", 1).status == 200

    # The engine goes away and comes back (SIGKILL: nothing is written at shutdown); the SDK
    # reconnects on its own with CleanSession=0 and subscribes to nothing.
    hub.kill_engine()
    hub.start_engine()
    wait_until(lambda: metric_sum_of(hub.metrics(), "roost_connections_current") >= 1, 60,
               "the SDK reconnected", interval=0.5)
    result = invoke(rm, device_id, "after", 2, connect_timeout=10)
    assert result.status == 200 and result.payload["method"] == "after"
    assert [name for name, _ in seen][-1] == "after"
    rm.update_twin(device_id, Twin(properties=TwinProperties(desired={"k": "v"})))
    assert patches.get(timeout=10) == {"k": "v", "$version": 2}


def test_session_present_and_clean_session(shared_hub):
    hub = shared_hub
    device_id = unique_id("sess")
    key = parse_connection_string(hub.create_device(device_id))["SharedAccessKey"]
    rm = hub.registry_manager()

    first = hub.raw_connected_device(device_id, key, clean_session=False)
    assert first.connack_flags == 0, "no session yet"
    first.subscribe_collect("$iothub/methods/POST/#")
    first.close()

    # Resumed: session-present, and a method reaches it without a new SUBSCRIBE.
    second = hub.raw_connected_device(device_id, key, clean_session=False)
    assert second.connack_flags & 1 == 1, "session-present"
    got: queue.Queue = queue.Queue()
    second.client.on_message = lambda c, u, m: got.put(m.topic)
    with pytest.raises(HttpOperationError) as err:
        invoke(rm, device_id, "ping", None, response_timeout=5)
    assert status_and_code(err.value) == (504, 504101), "delivered, but raw paho does not answer"
    assert got.get(timeout=5).startswith("$iothub/methods/POST/ping/?$rid=")
    second.close()

    # CleanSession=1: nothing resumed, and the stored session is gone for the next one too.
    clean = hub.raw_connected_device(device_id, key, clean_session=True)
    assert clean.connack_flags == 0
    with pytest.raises(HttpOperationError) as err:
        invoke(rm, device_id, "ping", None)
    assert status_and_code(err.value) == (404, 404103)
    clean.close()
    again = hub.raw_connected_device(device_id, key, clean_session=False)
    assert again.connack_flags == 0, "CleanSession=1 forgot the session"
    time.sleep(0.2)
