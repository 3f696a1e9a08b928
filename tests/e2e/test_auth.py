"""Device authentication over MQTT (SAS, refusals by reason, registry changes reaching a running
engine, one connection per identity) and the service REST API's identity operations and auth."""

from __future__ import annotations

import base64
import json

import pytest
import requests
from azure.iot.device import Message
from msrest.exceptions import HttpOperationError

from conftest import (
    make_module_client,
    STATE_TIMEOUT,
    call_with_timeout,
    device_connection_string,
    device_sas_token,
    metric_sum_of,
    mqtt_username,
    parse_connection_string,
    random_key,
    record_body,
    service_sas_token,
    shutdown_client,
    telemetry_of,
    unique_id,
    wait_until,
)

REFUSED = "roost_connect_refused_total"


def refused(metrics: dict, reason: str) -> float:
    return metric_sum_of(metrics, REFUSED, reason=reason)


def wait_refused(hub, before: dict, reason: str) -> None:
    hub.wait_metric(REFUSED, lambda v: v >= refused(before, reason) + 1, f"+1 over {refused(before, reason)}",
                    reason=reason)


def known_device(hub, prefix: str) -> tuple[str, str]:
    """Create a device and wait until the engine accepts it (registry delta arrived)."""
    device_id = unique_id(prefix)
    conn_str = hub.create_device(device_id)
    shutdown_client(hub.connected_client(conn_str))
    return device_id, conn_str


def sas_keys(rm, device_id: str) -> tuple[str, str]:
    sk = rm.get_device(device_id).authentication.symmetric_key
    return sk.primary_key, sk.secondary_key


def http_status(excinfo) -> int:
    return excinfo.value.response.status_code


# ------------------------------------------------------------------------------------------
# Refusals at CONNECT


def test_wrong_key_is_refused(shared_hub):
    hub = shared_hub
    device_id, _ = known_device(hub, "wrongkey")
    before = hub.metrics()
    hub.assert_refused(device_connection_string(hub.hostname, device_id, random_key()))
    wait_refused(hub, before, "signature_mismatch")
    after = hub.metrics()
    assert refused(after, "unknown_device") == refused(before, "unknown_device")
    assert refused(after, "device_disabled") == refused(before, "device_disabled")


def test_unknown_device_is_refused(shared_hub):
    hub = shared_hub
    before = hub.metrics()
    hub.assert_refused(device_connection_string(hub.hostname, unique_id("nobody"), random_key()))
    wait_refused(hub, before, "unknown_device")
    assert refused(hub.metrics(), "signature_mismatch") == refused(before, "signature_mismatch")


def test_disabled_device_is_refused(shared_hub):
    hub = shared_hub
    device_id, conn_str = known_device(hub, "disabled")
    rm = hub.registry_manager()
    primary, secondary = sas_keys(rm, device_id)
    # Keys passed explicitly so that the only change is the status.
    updated = rm.update_device_with_sas(device_id, etag="*", primary_key=primary, secondary_key=secondary,
                                        status="disabled")
    assert updated.status == "disabled"
    assert rm.get_device(device_id).status == "disabled"
    before = hub.metrics()
    hub.assert_refused(conn_str, timeout=STATE_TIMEOUT)
    wait_refused(hub, before, "device_disabled")


@pytest.mark.parametrize("case, reason", [
    ("expired", "token_expired"),
    ("garbage", "bad_token"),
    ("other-device-username", "client_id_mismatch"),
    ("no-password", "no_password"),
])
def test_raw_connect_refusals(shared_hub, case, reason):
    """CONNECTs the SDK never sends, with raw paho: each refused (CONNACK 4 or 5) and counted."""
    hub = shared_hub
    device_id, conn_str = known_device(hub, "raw")
    key = parse_connection_string(conn_str)["SharedAccessKey"]
    kwargs = {
        "expired": dict(password=device_sas_token(hub.hostname, device_id, key, ttl=-3600)),
        "garbage": dict(password="SharedAccessSignature not-a-token"),
        "other-device-username": dict(username=mqtt_username(hub.hostname, unique_id("someone-else"))),
        "no-password": dict(send_password=False),
    }[case]
    before = hub.metrics()
    rc = hub.raw_device(device_id, key, **kwargs).connect_refused()
    assert rc in (4, 5), f"CONNACK return code {rc}"
    wait_refused(hub, before, reason)


def test_deleted_while_connected_cannot_reconnect(shared_hub):
    hub = shared_hub
    device_id = unique_id("deleted")
    conn_str = hub.create_device(device_id)
    client = hub.connected_client(conn_str)
    assert client.connected
    hub.delete_device(device_id)  # `roost device delete`
    rm = hub.registry_manager()
    with pytest.raises(HttpOperationError) as ei:
        rm.get_device(device_id)
    assert http_status(ei) == 404
    before = hub.metrics()
    hub.assert_refused(conn_str, timeout=STATE_TIMEOUT)
    wait_refused(hub, before, "unknown_device")


def test_disabled_while_connected_cannot_reconnect(shared_hub):
    hub = shared_hub
    device_id = unique_id("disabling")
    conn_str = hub.create_device(device_id)
    client = hub.connected_client(conn_str)
    assert client.connected
    rm = hub.registry_manager()
    primary, secondary = sas_keys(rm, device_id)
    rm.update_device_with_sas(device_id, etag="*", primary_key=primary, secondary_key=secondary,
                              status="disabled")
    before = hub.metrics()
    hub.assert_refused(conn_str, timeout=STATE_TIMEOUT)
    wait_refused(hub, before, "device_disabled")


def test_second_connection_replaces_first(shared_hub):
    hub = shared_hub
    device_id, conn_str = known_device(hub, "twice")
    rm = hub.registry_manager()
    metric = "roost_disconnects_total"
    before = hub.metrics()
    first = hub.connected_client(conn_str)
    second = hub.connected_client(conn_str)
    wait_until(lambda: not first.connected, 10, "the first connection to be closed by the hub")
    hub.wait_metric(metric, lambda v: v >= metric_sum_of(before, metric, reason="replaced_by_new_connection") + 1,
                    "+1", reason="replaced_by_new_connection")
    assert second.connected
    hub.wait_metric("roost_connections_current", lambda v: v == 1, "== 1 (old connection gone)")
    body = f"from the second connection {device_id}"
    call_with_timeout(second.send_message, Message(body), what="send on the second connection")
    assert [record_body(r) for r in telemetry_of(hub.records(), device_id)] == [body.encode()]
    hub.wait_connection_state(rm, device_id, "Connected")


def test_the_sdk_module_client_of_an_unregistered_module_is_refused(shared_hub):
    """The Python SDK's module client for a module the registry does not hold, with its
    device's key: refused (a module is its own identity with its own keys; test_modules.py has
    registered ones), and the device's own connection is left alone."""
    hub = shared_hub
    device_id, conn_str = known_device(hub, "withmod")
    device = hub.connected_client(conn_str)
    before = hub.metrics()
    module = make_module_client(f"{conn_str};ModuleId=sensor", hub.ca_pem, hub.mqtt_port)
    with pytest.raises(Exception):
        call_with_timeout(module.connect, what="module connect")
    wait_refused(hub, before, "unknown_module")
    call_with_timeout(device.send_message, Message(f"device {device_id}"), what="device send")
    assert device.connected, "the module's attempt closed its device's connection"
    shutdown_client(module)


# ------------------------------------------------------------------------------------------
# Service REST API


def test_registry_manager_identity_lifecycle(shared_hub):
    hub = shared_hub
    rm = hub.registry_manager()
    device_id = unique_id("svc")

    created = rm.create_device_with_sas(device_id, None, None, "enabled")
    assert created.device_id == device_id
    assert created.status == "enabled"
    assert created.etag
    primary = created.authentication.symmetric_key.primary_key
    secondary = created.authentication.symmetric_key.secondary_key
    for key in (primary, secondary):
        assert key and base64.b64decode(key, validate=True), f"generated key not base64: {key!r}"
    assert primary != secondary

    got = rm.get_device(device_id)
    assert got.device_id == device_id
    assert got.authentication.symmetric_key.primary_key == primary
    assert got.authentication.symmetric_key.secondary_key == secondary
    assert got.connection_state == "Disconnected"
    assert device_id in [d["deviceId"] for d in hub.list_devices()]
    assert hub.show_device(device_id)["deviceId"] == device_id

    # The generated key works for the device SDK.
    client = hub.connected_client(device_connection_string(hub.hostname, device_id, secondary))
    assert client.connected
    shutdown_client(client)

    # PUT without If-Match on an existing device: 409.
    with pytest.raises(HttpOperationError) as ei:
        rm.create_device_with_sas(device_id, None, None, "enabled")
    assert http_status(ei) == 409

    # If-Match that does not match the etag: 412.
    with pytest.raises(HttpOperationError) as ei:
        rm.update_device_with_sas(device_id, etag="not-the-etag", primary_key=primary, secondary_key=secondary,
                                  status="disabled")
    assert http_status(ei) == 412
    assert rm.get_device(device_id).status == "enabled"

    # The current etag matches.
    updated = rm.update_device_with_sas(device_id, etag=got.etag, primary_key=primary, secondary_key=secondary,
                                        status="disabled")
    assert updated.status == "disabled"
    assert rm.get_device(device_id).status == "disabled"

    rm.delete_device(device_id)
    with pytest.raises(HttpOperationError) as ei:
        rm.get_device(device_id)
    assert http_status(ei) == 404


def test_service_rest_raw(shared_hub):
    hub = shared_hub
    url = f"{hub.service_url}/devices/{unique_id('raw')}"
    device_id = url.rsplit("/", 1)[1]
    params = {"api-version": "2021-04-12"}
    body = {"deviceId": device_id, "status": "enabled",
            "authentication": {"type": "sas", "symmetricKey": {}}, "capabilities": {"iotEdge": False}}

    # PUT of a new device returns 200 (not 201) with the identity and generated keys.
    r = requests.put(url, params=params, headers=hub.service_headers(), data=json.dumps(body),
                     verify=hub.ca_path, timeout=10)
    assert r.status_code == 200, r.text
    dev = r.json()
    assert dev["deviceId"] == device_id
    assert base64.b64decode(dev["authentication"]["symmetricKey"]["primaryKey"], validate=True)
    assert dev["etag"]

    # A token signed with the wrong key: 401 with an IoT Hub error body and iothub-errorcode.
    bad = service_sas_token(hub.hostname, "iothubowner", random_key())
    r = requests.get(url, params=params, headers=hub.service_headers(bad), verify=hub.ca_path, timeout=10)
    assert r.status_code == 401, r.text
    assert r.headers.get("iothub-errorcode"), dict(r.headers)
    assert "Message" in r.json(), r.text

    # No token at all: 401 as well.
    r = requests.get(url, params=params, verify=hub.ca_path, timeout=10)
    assert r.status_code == 401, r.text

    # The right token still reads it, and DELETE answers 204.
    r = requests.get(url, params=params, headers=hub.service_headers(), verify=hub.ca_path, timeout=10)
    assert r.status_code == 200 and r.json()["deviceId"] == device_id, r.text
    r = requests.delete(url, params=params, headers={**hub.service_headers(), "If-Match": '"*"'},
                        verify=hub.ca_path, timeout=10)
    assert r.status_code == 204, r.text
    r = requests.get(url, params=params, headers=hub.service_headers(), verify=hub.ca_path, timeout=10)
    assert r.status_code == 404, r.text


def test_service_key_in_hub_json_matches_connection_string(shared_hub):
    """The owner key the raw tests sign with is the one in hub.json's connection string."""
    fields = parse_connection_string(shared_hub.service_connection_string)
    assert fields["HostName"] == shared_hub.hostname
    assert fields["SharedAccessKeyName"] == "iothubowner"
    assert base64.b64decode(fields["SharedAccessKey"], validate=True)


def test_bulk_registry_operations(shared_hub):
    """POST /devices (bulk ExportImportDevice): create many in one call, per-device errors,
    and the created identities reach the engine (a device connects with its key)."""
    hub = shared_hub
    url = f"{hub.service_url}/devices"
    params = {"api-version": "2021-04-12"}
    key = random_key()
    ids = [unique_id("bulk") for _ in range(3)]
    create = [{"id": i, "importMode": "create", "status": "enabled",
               "authentication": {"type": "sas", "symmetricKey": {"primaryKey": key, "secondaryKey": key}}}
              for i in ids]
    r = requests.post(url, params=params, headers=hub.service_headers(), data=json.dumps(create),
                      verify=hub.ca_path, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"isSuccessful": True, "errors": [], "warnings": []}
    client = hub.connected_client(device_connection_string(hub.hostname, ids[0], key))
    shutdown_client(client)

    # Creating an existing device fails for that device only; the new one is created.
    extra = unique_id("bulk")
    again = [create[1], {**create[1], "id": extra}]
    r = requests.post(url, params=params, headers=hub.service_headers(), data=json.dumps(again),
                      verify=hub.ca_path, timeout=10)
    assert r.status_code == 400, r.text
    result = r.json()
    assert result["isSuccessful"] is False
    assert [(e["deviceId"], e["errorCode"]) for e in result["errors"]] == [(ids[1], "DeviceAlreadyExists")]
    r = requests.get(f"{url}/{extra}", params=params, headers=hub.service_headers(), verify=hub.ca_path, timeout=10)
    assert r.status_code == 200, r.text

    # Bulk delete, and more than 100 entries is refused whole.
    delete = [{"id": i, "importMode": "delete"} for i in ids + [extra]]
    r = requests.post(url, params=params, headers=hub.service_headers(), data=json.dumps(delete),
                      verify=hub.ca_path, timeout=10)
    assert r.status_code == 200 and r.json()["isSuccessful"], r.text
    for i in ids + [extra]:
        r = requests.get(f"{url}/{i}", params=params, headers=hub.service_headers(), verify=hub.ca_path, timeout=10)
        assert r.status_code == 404, r.text
    too_many = [{"id": f"x{n}", "importMode": "create"} for n in range(101)]
    r = requests.post(url, params=params, headers=hub.service_headers(), data=json.dumps(too_many),
                      verify=hub.ca_path, timeout=10)
    assert r.status_code == 400, r.text
