"""Module identities with the official Python SDKs: created, read, listed and deleted with
`IoTHubRegistryManager`; an `IoTHubModuleClient` with the module's own keys sends telemetry
(stamped with its module id), reads and reports its module twin, gets desired patches and
answers module methods; its device's key never authenticates it, and the module and its
device stay connected side by side."""

from __future__ import annotations

import queue

import pytest
from azure.iot.device import Message
from azure.iot.hub.models import Twin, TwinProperties
from msrest.exceptions import HttpOperationError

from conftest import (
    call_with_timeout,
    make_module_client,
    metric_sum_of,
    telemetry_of,
    unique_id,
    wait_until,
)
from test_methods import answer_with, status_and_code


def module_connection_string(hub, device_id: str, module_id: str, key: str) -> str:
    return f"HostName={hub.hostname};DeviceId={device_id};ModuleId={module_id};SharedAccessKey={key}"


def connected_module(hub, conn_str: str):
    """A connected module client; the module reaches the engine's replica asynchronously."""
    from azure.iot.device.exceptions import CredentialError

    def attempt():
        client = make_module_client(conn_str, hub.ca_pem, hub.mqtt_port)
        try:
            call_with_timeout(client.connect, what="module connect")
            return client
        except CredentialError:
            client.shutdown()
            return None

    return wait_until(attempt, 20, "the module connects")


def test_module_lifecycle_telemetry_twin_and_methods(shared_hub):
    hub = shared_hub
    rm = hub.registry_manager()
    device_id = unique_id("mod")
    device_conn = hub.create_device(device_id)
    device_key = device_conn.split("SharedAccessKey=")[1]

    created = rm.create_module_with_sas(device_id, "sensor", None, None, None)
    assert created.module_id == "sensor" and created.device_id == device_id
    key = created.authentication.symmetric_key.primary_key
    assert key and key != device_key
    assert [m.module_id for m in rm.get_modules(device_id)] == ["sensor"]
    with pytest.raises(HttpOperationError) as err:
        rm.get_module(device_id, "nope")
    assert status_and_code(err.value) == (404, "ModuleNotFound")

    device = hub.connected_client(device_conn)
    module = connected_module(hub, module_connection_string(hub, device_id, "sensor", key))
    # Side by side: neither replaces the other.
    call_with_timeout(module.send_message, Message("from the module"), what="module send")
    call_with_timeout(device.send_message, Message("from the device"), what="device send")
    assert device.connected and module.connected
    records = telemetry_of(hub.records(), device_id)
    by_body = {r["body"]: r["systemProperties"].get("iothub-connection-module-id") for r in records}
    assert by_body == {"from the module": "sensor", "from the device": None}, by_body
    wait_until(lambda: rm.get_module(device_id, "sensor").connection_state == "Connected", 10,
               "the module is Connected")

    # The module twin, from both sides.
    call_with_timeout(module.patch_twin_reported_properties, {"fw": "2.0"}, what="module report")
    mt = rm.get_module_twin(device_id, "sensor")
    assert mt.module_id == "sensor" and mt.properties.reported["fw"] == "2.0"
    assert rm.get_twin(device_id).properties.reported.get("fw") is None, "not the device's twin"
    patches: queue.Queue = queue.Queue()
    module.on_twin_desired_properties_patch_received = patches.put
    seen = answer_with(module)
    wait_until(lambda: _module_method_ok(rm, device_id), 10, "the module takes methods")
    rm.update_module_twin(device_id, "sensor", Twin(properties=TwinProperties(desired={"rate": 2})))
    assert patches.get(timeout=10) == {"rate": 2, "$version": 2}
    assert call_with_timeout(module.get_twin, what="module get_twin")["desired"]["rate"] == 2
    assert seen and all(name == "ping" for name, _ in seen), seen

    # Deleting the module ends its connection and its identity.
    before = hub.metrics()
    rm.delete_module(device_id, "sensor")
    hub.wait_metric("roost_disconnects_total",
                    lambda v: v >= metric_sum_of(before, "roost_disconnects_total", reason="device_revoked") + 1,
                    "+1", reason="device_revoked")
    assert device.connected, "deleting the module leaves its device alone"
    assert rm.get_modules(device_id) == []


def _module_method_ok(rm, device_id: str) -> bool:
    from azure.iot.hub.models import CloudToDeviceMethod

    try:
        r = rm.invoke_device_module_method(device_id, "sensor", CloudToDeviceMethod(
            method_name="ping", payload={"x": 1}, response_timeout_in_seconds=5))
    except HttpOperationError as e:
        if status_and_code(e) == (404, 404103):
            return False
        raise
    assert r.status == 200 and r.payload == {"echo": {"x": 1}, "method": "ping"}
    return True


def test_a_module_is_refused_with_its_devices_key(shared_hub):
    hub = shared_hub
    rm = hub.registry_manager()
    device_id = unique_id("mod")
    device_conn = hub.create_device(device_id)
    device_key = device_conn.split("SharedAccessKey=")[1]
    rm.create_module_with_sas(device_id, "edge", None, None, None)
    before = hub.metrics()
    from azure.iot.device.exceptions import CredentialError

    # Keep trying until the module is at the engine: then the refusal is the key's.
    def refused_for_the_key() -> bool:
        client = make_module_client(module_connection_string(hub, device_id, "edge", device_key),
                                    hub.ca_pem, hub.mqtt_port)
        try:
            with pytest.raises(CredentialError):
                call_with_timeout(client.connect, what="module connect with the device key")
        finally:
            client.shutdown()
        m = hub.metrics()
        return metric_sum_of(m, "roost_connect_refused_total", reason="signature_mismatch") > \
            metric_sum_of(before, "roost_connect_refused_total", reason="signature_mismatch")

    wait_until(refused_for_the_key, 20, "refused as a signature mismatch")
