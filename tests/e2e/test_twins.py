"""Device twins with the official Python SDKs: the device reads its twin and reports over MQTT,
the service reads, patches and replaces it over REST (`IoTHubRegistryManager`), a desired
change reaches the subscribed device (a PATCH as its delta, a PUT as the whole document), and
the error paths: a stale etag (412), a twin over the limits (400, REST and MQTT), a device
that asks while control is down (answered, not left waiting)."""

from __future__ import annotations

import json
import queue
import time

import pytest
import requests
from azure.iot.hub.models import Twin, TwinProperties
from msrest.exceptions import HttpOperationError

from conftest import (
    call_with_timeout,
    metric_sum_of,
    unique_id,
    wait_until,
)


def desired_of(twin) -> dict:
    """The desired members of a service SDK twin, without the hub's `$` fields."""
    return {k: v for k, v in twin.properties.desired.items() if not k.startswith("$")}


def test_device_reads_and_reports_and_the_service_sees_it(shared_hub):
    hub = shared_hub
    device_id = unique_id("twin")
    client = hub.connected_client(hub.create_device(device_id))
    twin = call_with_timeout(client.get_twin, what="get_twin")
    # Spec §0 rule 3: both $versions, or Python raises KeyError.
    assert twin["desired"]["$version"] == 1, twin
    assert twin["reported"]["$version"] == 1, twin
    assert "tags" not in twin

    call_with_timeout(client.patch_twin_reported_properties,
                      {"firmware": "1.2.3", "temp": {"c": 21.5, "probe": "a"}}, what="report")
    call_with_timeout(client.patch_twin_reported_properties, {"temp": {"probe": None}},
                      what="report delete")
    twin = call_with_timeout(client.get_twin, what="get_twin again")
    assert twin["reported"]["firmware"] == "1.2.3"
    assert twin["reported"]["temp"] == {"c": 21.5}, "null deleted the member"
    assert twin["reported"]["$version"] == 3

    rm = hub.registry_manager()
    st = rm.get_twin(device_id)
    assert st.device_id == device_id
    assert st.properties.reported["firmware"] == "1.2.3"
    assert st.properties.reported["$version"] == 3
    assert st.version == 3
    assert st.connection_state == "Connected"
    assert st.status == "enabled"
    assert st.authentication_type == "sas"
    meta = st.properties.reported["$metadata"]
    assert meta["firmware"]["$lastUpdated"].endswith("Z"), meta
    assert "$lastUpdated" in meta["temp"]["c"], meta


def test_a_service_update_reaches_the_subscribed_device(shared_hub):
    hub = shared_hub
    device_id = unique_id("twin")
    client = hub.connected_client(hub.create_device(device_id))
    patches: queue.Queue = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put
    # Setting the handler subscribes; wait for it to take hold before the service writes.
    wait_until(lambda: metric_sum_of(hub.metrics(), "roost_connections_current") >= 1, 10,
               "connected")
    time.sleep(1.0)

    rm = hub.registry_manager()
    st = rm.update_twin(device_id, Twin(tags={"site": "oslo"},
                                        properties=TwinProperties(desired={"rate": 5, "mode": "eco"})))
    assert st.tags == {"site": "oslo"}
    assert desired_of(st) == {"rate": 5, "mode": "eco"}
    patch = patches.get(timeout=10)
    assert patch == {"rate": 5, "mode": "eco", "$version": 2}, patch

    # A PATCH sends the delta only.
    rm.update_twin(device_id, Twin(properties=TwinProperties(desired={"mode": None})), st.etag)
    patch = patches.get(timeout=10)
    assert patch == {"mode": None, "$version": 3}, patch

    # A PUT replaces tags and desired and sends the whole desired document.
    st = rm.replace_twin(device_id, Twin(properties=TwinProperties(desired={"only": True})))
    assert st.tags == {}
    assert desired_of(st) == {"only": True}
    patch = patches.get(timeout=10)
    assert patch == {"only": True, "$version": 4}, patch

    twin = call_with_timeout(client.get_twin, what="get_twin")
    assert twin["desired"] == {"only": True, "$version": 4}, twin
    m = hub.control_metrics()
    assert metric_sum_of(m, "roost_control_desired_pushes_total", outcome="sent") >= 3


def test_if_match_and_limits_are_enforced(shared_hub):
    hub = shared_hub
    device_id = unique_id("twin")
    hub.create_device(device_id)
    rm = hub.registry_manager()
    st = rm.get_twin(device_id)
    rm.update_twin(device_id, Twin(tags={"a": 1}), st.etag)
    # The etag moved on: the old one is refused with 412 PreconditionFailed.
    with pytest.raises(HttpOperationError) as err:
        rm.update_twin(device_id, Twin(tags={"a": 2}), st.etag)
    assert err.value.response.status_code == 412
    assert err.value.response.headers.get("iothub-errorcode") == "PreconditionFailed"

    url = f"{hub.service_url}/twins/{device_id}?api-version=2021-04-12"
    big = {f"k{i}": "x" * 3000 for i in range(12)}  # 36 KB of desired properties
    deep = {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}
    for body in ({"properties": {"desired": big}}, {"properties": {"desired": deep}},
                 {"tags": {f"t{i}": "y" * 1000 for i in range(9)}}):
        r = requests.patch(url, json=body, headers=hub.service_headers(), verify=hub.ca_path, timeout=10)
        assert r.status_code == 400, r.text
        assert json.loads(r.json()["Message"])["errorCode"] == 400004, r.text
    assert rm.get_twin(device_id).tags == {"a": 1}, "a refused update changes nothing"

    # Over MQTT: a reported patch over the limits is answered 400, the connection stays.
    raw, _, _ = hub.new_raw_device("twinraw")
    answers = raw.subscribe_collect("$iothub/twin/res/#")
    raw.publish("$iothub/twin/PATCH/properties/reported/?$rid=big", json.dumps(big))
    raw.publish("$iothub/twin/PATCH/properties/reported/?$rid=deep", json.dumps(deep))
    raw.publish("$iothub/twin/PATCH/properties/reported/?$rid=bad", b"not json")
    raw.publish("$iothub/twin/PATCH/properties/reported/?$rid=ok", json.dumps({"v": 1}))
    got = {}
    deadline = time.monotonic() + 10
    while len(got) < 4 and time.monotonic() < deadline:
        try:
            topic, payload = answers.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        status = int(topic.split("/")[3])
        rid = topic.split("$rid=")[1].split("&")[0]
        got[rid] = (status, topic, payload)
    assert {k: v[0] for k, v in got.items()} == {"big": 400, "deep": 400, "bad": 400, "ok": 204}, got
    assert got["ok"][1].endswith("&$version=2"), got["ok"]
    assert json.loads(got["big"][2])["errorCode"] == 400004, got["big"]
    assert raw.connected


def test_a_twin_request_is_answered_while_control_is_down(hub):
    device_id = unique_id("twin")
    client = hub.connected_client(hub.create_device(device_id))
    assert call_with_timeout(client.get_twin, what="get_twin")["desired"]["$version"] == 1
    hub.stop_control()
    t0 = time.monotonic()
    from azure.iot.device.exceptions import ClientError

    # The SDK raises ClientError("Unexpected failure") from ServiceError("twin operation
    # returned status 504").
    with pytest.raises(ClientError) as err:
        call_with_timeout(client.get_twin, what="get_twin without control", timeout=30)
    assert "status 504" in str(err.value.__cause__), repr(err.value.__cause__)
    waited = time.monotonic() - t0
    assert waited < 15, f"answered after {waited:.1f} s"
    hub.start_control()
    wait_until(lambda: metric_sum_of(hub.metrics(), "roost_link_connected") == 1, 20, "link back")
    assert call_with_timeout(client.get_twin, what="get_twin after")["reported"]["$version"] == 1


def test_tags_reach_the_engines_registry_view(shared_hub):
    """A service tag change is replicated to the engine (what routing over `$twin.tags` reads),
    and the connected device stays connected (tags are not credentials)."""
    hub, rm = shared_hub, shared_hub.registry_manager()
    device_id = unique_id("tags")
    client = hub.connected_client(hub.create_device(device_id))
    rm.update_twin(device_id, Twin(tags={"site": "oslo", "floor": 3}), "*")
    entry = wait_until(lambda: (e := hub.ops_get(f"/registry/devices/{device_id}"))["tags"] and e, 10,
                       "the engine's registry view has the tags")
    assert entry["tags"] == {"site": "oslo", "floor": 3}
    assert entry["enabled"] is True and "primaryKey" not in json.dumps(entry)
    rm.update_twin(device_id, Twin(tags={"floor": None}), "*")
    wait_until(lambda: hub.ops_get(f"/registry/devices/{device_id}")["tags"] == {"site": "oslo"}, 10,
               "a deleted tag leaves the view")
    assert client.connected, "a tag change does not disconnect the device"
    assert hub.connection_state(rm, device_id) == "Connected"
