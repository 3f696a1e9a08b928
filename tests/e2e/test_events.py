"""The hub's own events in the built-in `events` log (issue 8 §6), read back with the consumer
API and the CLI: a device's and a module's lifecycle (`deviceLifecycleEvents`), twin changes from
the service and from the device (`twinChangeEvents`, with the changed section and the new
version), connection state (`deviceConnectionStateEvents`), each with IoT Hub's application
properties; filtering by source; and an event of a change made while no engine runs, appended
once one is back (control's outbox)."""

from __future__ import annotations

import json

from azure.iot.hub.models import Twin, TwinProperties

from conftest import call_with_timeout, metric_sum_of, record_body, unique_id, wait_until


def events_of(hub, device_id: str, source: str | None = None) -> list[dict]:
    return [r for r in hub.records()
            if r["properties"].get("deviceId") == device_id
            and (source is None or r["systemProperties"]["iothub-message-source"] == source)]


def op_types(records: list[dict]) -> list[str]:
    return [r["properties"]["opType"] for r in records]


def wait_events(hub, device_id: str, source: str, n: int) -> list[dict]:
    return wait_until(lambda: (e := events_of(hub, device_id, source)) and len(e) >= n and e, 15,
                      f"{n} {source} events of {device_id}")


def test_lifecycle_twin_and_connection_events(shared_hub):
    hub, rm = shared_hub, shared_hub.registry_manager()
    device_id = unique_id("ev")
    conn = hub.create_device(device_id)
    created = wait_events(hub, device_id, "deviceLifecycleEvents", 1)[0]
    props, sysp = created["properties"], created["systemProperties"]
    assert props["opType"] == "createDeviceIdentity"
    assert props["hubName"] == hub.hostname.split(".")[0]
    assert props["iothub-message-schema"] == "deviceLifecycleNotification"
    assert props["operationTimestamp"].endswith("Z")
    assert sysp["iothub-connection-device-id"] == device_id
    assert sysp["content-type"] == "application/json"
    body = json.loads(record_body(created))
    assert body["deviceId"] == device_id and body["version"] == 1, body

    rm.update_twin(device_id, Twin(tags={"site": "oslo"}, properties=TwinProperties(desired={"rate": 5})), "*")
    change = wait_events(hub, device_id, "twinChangeEvents", 1)[0]
    assert change["properties"]["opType"] == "updateTwin"
    assert change["properties"]["iothub-message-schema"] == "twinChangeNotification"
    body = json.loads(record_body(change))
    assert body["tags"] == {"site": "oslo"}
    assert body["properties"]["desired"]["rate"] == 5
    assert body["properties"]["desired"]["$version"] == 2
    assert body["version"] == 2

    client = hub.connected_client(conn)
    call_with_timeout(client.patch_twin_reported_properties, {"fw": "1.0"}, what="report")
    reported = wait_events(hub, device_id, "twinChangeEvents", 2)[1]
    body = json.loads(record_body(reported))
    assert body["properties"]["reported"] == {"fw": "1.0", "$version": 2}, body
    assert wait_events(hub, device_id, "deviceConnectionStateEvents", 1)[0]["properties"]["opType"] == "deviceConnected"
    client.shutdown()
    states = wait_events(hub, device_id, "deviceConnectionStateEvents", 2)
    assert op_types(states) == ["deviceConnected", "deviceDisconnected"]
    seqs = [json.loads(record_body(r))["sequenceNumber"] for r in states]
    assert seqs[0] < seqs[1], seqs

    hub.cli("module", "create", device_id, "m1")
    hub.cli("module", "delete", device_id, "m1")
    hub.delete_device(device_id)
    life = wait_events(hub, device_id, "deviceLifecycleEvents", 4)
    assert op_types(life) == ["createDeviceIdentity", "createModuleIdentity", "deleteModuleIdentity",
                              "deleteDeviceIdentity"], op_types(life)
    assert life[1]["properties"]["moduleId"] == "m1"
    assert life[1]["systemProperties"]["iothub-connection-module-id"] == "m1"

    # The consumer API and the CLI filter by source.
    only = hub.tail_events("--source", "deviceLifecycleEvents")
    assert {r["systemProperties"]["iothub-message-source"] for r in only} == {"deviceLifecycleEvents"}
    assert device_id in {r["properties"].get("deviceId") for r in only}
    bad = hub.cli("events", "tail", "--source", "nope", check=False)
    assert bad.returncode != 0 and "source must be" in bad.stderr


def test_an_event_waits_for_an_engine(hub):
    """A twin changed while the engine is down: control keeps the event and appends it once
    an engine is linked again."""
    rm = hub.registry_manager()
    device_id = unique_id("outbox")
    hub.create_device(device_id)
    wait_events(hub, device_id, "deviceLifecycleEvents", 1)
    hub.stop_engine()
    rm.update_twin(device_id, Twin(properties=TwinProperties(desired={"while": "down"})), "*")
    hub.start_engine()
    change = wait_events(hub, device_id, "twinChangeEvents", 1)[0]
    assert json.loads(record_body(change))["properties"]["desired"]["while"] == "down"
    assert metric_sum_of(hub.control_metrics(), "roost_control_hub_events_total", source="twinChangeEvents") >= 1
