"""The Device Provisioning Service (issue 12, spec §7): enrollments made through the service
API (`/enrollments`, `/enrollmentGroups`, with the service's own policy token), then the
unmodified Python `ProvisioningDeviceClient` registering over MQTT — a symmetric-key group
enrollment (the device's key derived from the group's) and an X.509 individual enrollment —
and connecting to the hub it was assigned, where it was created with the enrollment's initial
twin. The Node provisioning device SDK (Mqtt, Http) and service client are in
`node/dps.js`. Refused, each counted: a key no enrollment derives, a certificate that is not
the enrollment's, a disabled enrollment."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import urllib.parse
from pathlib import Path

import pytest
import requests
from azure.iot.device import Message

from conftest import (call_with_timeout, metric_sum_of, redirect_mqtt_to, service_sas_token, shutdown_client,
                      unique_id)

API = {"api-version": "2021-10-01"}


def dps_call(hub, method: str, path: str, **kw) -> requests.Response:
    d = hub.dps
    parts = dict(p.split("=", 1) for p in d["service_connection_string"].split(";"))
    token = service_sas_token(parts["HostName"], parts["SharedAccessKeyName"], parts["SharedAccessKey"])
    return requests.request(method, f"https://127.0.0.1:{d['ports']['https']}{path}", params=API,
                            headers={"Authorization": token}, verify=hub.ca_path, timeout=15, **kw)


def derive(group_key: str, registration_id: str) -> str:
    mac = hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def provisioning_client(hub, registration_id: str, *, key: str | None = None, x509=None, websockets: bool = False):
    from azure.iot.device import ProvisioningDeviceClient

    redirect_mqtt_to(hub.dps["ports"]["mqtt"], hub.dps["ports"]["https"])
    common = dict(provisioning_host="localhost", registration_id=registration_id, id_scope=hub.dps["id_scope"],
                  server_verification_cert=hub.ca_pem, websockets=websockets)
    if x509 is not None:
        return ProvisioningDeviceClient.create_from_x509_certificate(x509=x509, **common)
    return ProvisioningDeviceClient.create_from_symmetric_key(symmetric_key=key, **common)


def hub_client(hub, device_id: str, assigned_hub: str, *, key: str | None = None, x509=None):
    from azure.iot.device import IoTHubDeviceClient

    redirect_mqtt_to(hub.mqtt_port)
    common = dict(hostname=assigned_hub, device_id=device_id, server_verification_cert=hub.ca_pem,
                  connection_retry=False)
    if x509 is not None:
        return IoTHubDeviceClient.create_from_x509_certificate(x509=x509, **common)
    return IoTHubDeviceClient.create_from_symmetric_key(symmetric_key=key, **common)


def test_a_symmetric_key_group_enrollment_provisions_devices_over_mqtt(shared_hub):
    hub = shared_hub
    group = unique_id("fleet")
    r = dps_call(hub, "PUT", f"/enrollmentGroups/{group}", json={
        "enrollmentGroupId": group,
        "attestation": {"type": "symmetricKey"},
        "initialTwin": {"tags": {"site": "lab"}, "properties": {"desired": {"rate": 5}}},
    })
    assert r.status_code == 200, r.text
    group_key = r.json()["attestation"]["symmetricKey"]["primaryKey"]
    assert r.json()["provisioningStatus"] == "enabled" and r.json()["etag"]

    registration_id = unique_id("sensor")
    device_key = derive(group_key, registration_id)
    client = provisioning_client(hub, registration_id, key=device_key)
    result = call_with_timeout(client.register, what="register", timeout=60)
    assert result.status == "assigned"
    state = result.registration_state
    assert state.assigned_hub == hub.hostname and state.device_id == registration_id
    assert state.sub_status == "initialAssignment"

    # The device is in the registry, with the derived key and the initial twin, before the
    # answer said assigned.
    device = hub.show_device(registration_id)
    assert device["authentication"]["symmetricKey"]["primaryKey"] == device_key
    twin = hub.registry_manager().get_twin(registration_id)
    assert twin.tags == {"site": "lab"} and twin.properties.desired["rate"] == 5

    device_client = hub_client(hub, state.device_id, state.assigned_hub, key=device_key)
    try:
        call_with_timeout(device_client.connect, what="connect to the assigned hub")
        call_with_timeout(device_client.send_message, Message("provisioned"), what="send")
    finally:
        shutdown_client(device_client)

    # Registering again (over MQTT in WebSockets, port 443's path) is a reprovisioning: the
    # device keeps its twin.
    result = call_with_timeout(provisioning_client(hub, registration_id, key=device_key, websockets=True).register,
                               what="register again", timeout=60)
    assert result.registration_state.sub_status == "deviceDataMigrated"
    state = dps_call(hub, "GET", f"/registrations/{registration_id}").json()
    assert state["status"] == "assigned" and state["deviceId"] == registration_id
    assert metric_sum_of(hub.control_metrics(), "roost_dps_registrations_total", outcome="assigned",
                         allocation="hashed") >= 2


def test_an_x509_individual_enrollment_provisions_a_device(shared_hub, tmp_path):
    from azure.iot.device import X509
    from azure.iot.device.exceptions import CredentialError

    from test_x509_ca import self_signed

    hub = shared_hub
    registration_id = unique_id("camera")
    for name in (registration_id, "other"):
        self_signed(tmp_path, name, registration_id)
    cert = (tmp_path / f"{registration_id}.pem").read_text()
    r = dps_call(hub, "PUT", f"/enrollments/{registration_id}", json={
        "registrationId": registration_id,
        "deviceId": registration_id + "-dev",
        "attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": cert}}}},
    })
    assert r.status_code == 200, r.text
    info = r.json()["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
    assert info["subjectName"] == f"CN={registration_id}" and len(info["sha256Thumbprint"]) == 64
    assert "certificate" not in r.json()["attestation"]["x509"]["clientCertificates"]["primary"]

    # Another certificate with the same name is not the enrollment's.
    other = X509(cert_file=str(tmp_path / "other.pem"), key_file=str(tmp_path / "other.key"))
    with pytest.raises(CredentialError):
        call_with_timeout(provisioning_client(hub, registration_id, x509=other).register, what="refused", timeout=60)

    mine = X509(cert_file=str(tmp_path / f"{registration_id}.pem"), key_file=str(tmp_path / f"{registration_id}.key"))
    result = call_with_timeout(provisioning_client(hub, registration_id, x509=mine).register, what="register",
                               timeout=60)
    assert result.status == "assigned" and result.registration_state.device_id == registration_id + "-dev"
    assert hub.show_device(registration_id + "-dev")["authentication"]["type"] == "selfSigned"
    device_client = hub_client(hub, registration_id + "-dev", result.registration_state.assigned_hub, x509=mine)
    try:
        call_with_timeout(device_client.connect, what="connect with the certificate")
    finally:
        shutdown_client(device_client)


def test_refusals(shared_hub):
    from azure.iot.device.exceptions import ClientError, CredentialError

    hub = shared_hub
    registration_id = unique_id("nobody")
    bogus = base64.b64encode(b"k" * 32).decode()
    with pytest.raises(CredentialError):
        call_with_timeout(provisioning_client(hub, registration_id, key=bogus).register, what="refused", timeout=60)
    assert metric_sum_of(hub.control_metrics(), "roost_dps_registrations_total", outcome="not_enrolled") >= 1

    # A disabled enrollment: the registration fails (the SDK raises), no device is made.
    disabled = unique_id("off")
    r = dps_call(hub, "PUT", f"/enrollments/{disabled}", json={
        "registrationId": disabled, "attestation": {"type": "symmetricKey"}, "provisioningStatus": "disabled"})
    assert r.status_code == 200, r.text
    key = r.json()["attestation"]["symmetricKey"]["primaryKey"]
    with pytest.raises(ClientError):
        call_with_timeout(provisioning_client(hub, disabled, key=key).register, what="disabled", timeout=60)
    assert hub.cli("device", "show", disabled, check=False).returncode != 0

    # The service API needs the service's own policy token; a hub token is not one.
    r = requests.get(f"https://127.0.0.1:{hub.dps['ports']['https']}/enrollments/{disabled}", params=API,
                     headers=hub.service_headers(), verify=hub.ca_path, timeout=10)
    assert r.status_code == 401, r.text
    assert dps_call(hub, "DELETE", f"/enrollments/{disabled}").status_code == 204
    assert dps_call(hub, "GET", f"/enrollments/{disabled}").status_code == 404


def test_the_node_provisioning_sdks(shared_hub, tmp_path):
    from test_node import node_steps
    from test_x509_ca import self_signed

    hub = shared_hub
    x509_reg = unique_id("node-x509")
    self_signed(tmp_path, "dev", x509_reg)
    suffix = unique_id("s")
    steps = node_steps(hub, "dps.js", ROOST_DPS_CS=hub.dps["service_connection_string"],
                       ROOST_DPS_SCOPE=hub.dps["id_scope"], ROOST_DPS_HTTPS_PORT=str(hub.dps["ports"]["https"]),
                       ROOST_DPS_MQTT_PORT=str(hub.dps["ports"]["mqtt"]),
                       ROOST_DPS_AMQP_PORT=str(hub.dps["ports"]["amqp"]), ROOST_SUFFIX=suffix,
                       ROOST_X509_REG=x509_reg, ROOST_CERT=str(tmp_path / "dev.pem"), ROOST_KEY=str(tmp_path / "dev.key"),
                       NODE_EXTRA_CA_CERTS=str(hub.ca_path))
    assert len(steps) == 10, [s["step"] for s in steps]
    assert hub.registry_manager().get_twin(f"node-mqtt-{suffix}").tags == {"by": "node"}
    sent = {r["systemProperties"].get("message-id") for r in hub.records()}
    assert {"dps-node-mqtt", "dps-node-http", "dps-node-amqp"} <= sent


def test_roost_dps_in_the_cli(shared_hub):
    hub = shared_hub
    shown = dict(line.split(": ", 1) for line in hub.cli("dps", "show").stdout.splitlines())
    assert shown["ID scope"] == hub.dps["id_scope"]
    group = unique_id("cligroup")
    made = json.loads(hub.cli("dps", "group", "create", group, "--twin", '{"tags": {"via": "cli"}}').stdout)
    assert made["attestation"]["type"] == "symmetricKey" and made["initialTwin"]["tags"] == {"via": "cli"}
    registration_id = unique_id("cli-dev")
    device_key = hub.cli("dps", "derive-key", group, registration_id).stdout.strip()
    assert device_key == derive(made["attestation"]["symmetricKey"]["primaryKey"], registration_id)
    result = call_with_timeout(provisioning_client(hub, registration_id, key=device_key).register, what="register",
                               timeout=60)
    assert result.status == "assigned"
    assert json.loads(hub.cli("dps", "registration", "show", registration_id).stdout)["status"] == "assigned"
    individual = unique_id("cli-one")
    enrolled = json.loads(hub.cli("dps", "enrollment", "create", individual, "--device-id", individual + "-d").stdout)
    assert enrolled["deviceId"] == individual + "-d"
    listed = json.loads(hub.cli("dps", "enrollment", "list").stdout)
    assert individual in [e["registrationId"] for e in listed]
    hub.cli("dps", "enrollment", "delete", individual)
    hub.cli("dps", "group", "delete", group)
    assert hub.cli("dps", "group", "show", group, check=False).returncode != 0


def test_x509_enrollment_groups_by_signing_certificate_and_by_hub_ca(shared_hub, tmp_path):
    from azure.iot.device import X509
    from azure.iot.device.exceptions import CredentialError
    from test_x509_ca import issue_device, root_and_intermediate, self_signed

    hub = shared_hub
    # A group whose signing certificate is an intermediate the device presents after its own.
    root_and_intermediate(tmp_path, "dps")
    group = unique_id("signed")
    r = dps_call(hub, "PUT", f"/enrollmentGroups/{group}", json={
        "enrollmentGroupId": group,
        "attestation": {"type": "x509", "x509": {"signingCertificates": {
            "primary": {"certificate": (tmp_path / "root.pem").read_text()}}}},
    })
    assert r.status_code == 200, r.text
    registration_id = unique_id("chained")
    cert, key = issue_device(tmp_path, registration_id, "inter", chain=["inter"])
    result = call_with_timeout(provisioning_client(hub, registration_id, x509=X509(cert_file=cert, key_file=key)).register,
                               what="register through the group", timeout=60)
    assert result.status == "assigned"
    device_client = hub_client(hub, registration_id, result.registration_state.assigned_hub,
                               x509=X509(cert_file=cert, key_file=key))
    try:
        call_with_timeout(device_client.connect, what="connect")
    finally:
        shutdown_client(device_client)
    # A certificate no group's CA signed is not enrolled.
    stranger_id = unique_id("stranger")
    self_signed(tmp_path, "s", stranger_id)
    with pytest.raises(CredentialError):
        call_with_timeout(provisioning_client(hub, stranger_id, x509=X509(cert_file=str(tmp_path / "s.pem"),
                                                                          key_file=str(tmp_path / "s.key"))).register,
                          what="refused", timeout=60)

    # A group that names a CA verified with the hub (`roost ca init`).
    ca_name = unique_id("dpsca")
    made = dict(line.split(": ", 1) for line in hub.cli("ca", "init", ca_name).stdout.splitlines())
    (tmp_path / "hubca.pem").write_text(Path(made["certificate"]).read_text())
    (tmp_path / "hubca.key").write_text(Path(made["key"]).read_text())
    json.loads(hub.cli("dps", "group", "create", unique_id("byca"), "--ca", ca_name).stdout)
    registration_id = unique_id("by-ca")
    cert, key = issue_device(tmp_path, registration_id, "hubca")
    result = call_with_timeout(provisioning_client(hub, registration_id, x509=X509(cert_file=cert, key_file=key)).register,
                               what="register through the hub's CA", timeout=60)
    assert result.status == "assigned" and result.registration_state.device_id == registration_id


ALLOCATE = """
-- Custom allocation: devices named by floor, their payload echoed with the floor's twin tag.
return {
  on_provision = function(request, conf, state)
    local floor = request.payload and request.payload.floor
    if not floor then return nil end
    return {
      deviceId = conf.prefix .. floor .. "-" .. request.registrationId,
      initialTwin = { tags = { floor = floor }, properties = { desired = { heating = conf.heating } } },
      payload = { floor = floor, welcome = "floor " .. floor },
    }
  end,
}
"""


def test_a_custom_allocation_runs_the_lua_on_provision_hook(hub, tmp_path):
    from azure.iot.device.exceptions import ClientError

    plugin = tmp_path / "plugins" / "by_floor"
    plugin.mkdir(parents=True)
    (plugin / "handler.lua").write_text(ALLOCATE)
    (plugin / "schema.lua").write_text(
        'return { fields = { prefix = { type = "string", default = "f" }, heating = { type = "integer" } } }')
    routes = tmp_path / "routes.lua"
    routes.write_text((Path(__file__).resolve().parents[2] / "routes.lua").read_text().replace(
        "  fallback = {", '  provisioning = { use = "by_floor", config = { heating = 21 } },\n  fallback = {'))
    hub.cli("routes", "apply", str(routes))
    group = unique_id("custom")
    r = dps_call(hub, "PUT", f"/enrollmentGroups/{group}", json={
        "enrollmentGroupId": group, "attestation": {"type": "symmetricKey"}, "allocationPolicy": "custom"})
    assert r.status_code == 200, r.text
    group_key = r.json()["attestation"]["symmetricKey"]["primaryKey"]

    registration_id = unique_id("thermo")
    client = provisioning_client(hub, registration_id, key=derive(group_key, registration_id))
    client.provisioning_payload = {"floor": 4}
    result = call_with_timeout(client.register, what="register", timeout=60)
    assert result.status == "assigned"
    device_id = f"f4-{registration_id}"
    assert result.registration_state.device_id == device_id
    assert json.loads(result.registration_state.response_payload) == {"floor": 4, "welcome": "floor 4"}
    twin = hub.registry_manager().get_twin(device_id)
    assert twin.tags == {"floor": 4} and twin.properties.desired["heating"] == 21
    assert metric_sum_of(hub.control_metrics(), "roost_dps_registrations_total", outcome="assigned",
                         allocation="custom") == 1
    # Without a floor the hook answers nil: the registration fails, no device is made.
    other = unique_id("nofloor")
    with pytest.raises(ClientError):
        call_with_timeout(provisioning_client(hub, other, key=derive(group_key, other)).register, what="refused",
                          timeout=60)
    state = dps_call(hub, "GET", f"/registrations/{other}").json()
    assert state["status"] == "failed" and "refused" in state["errorMessage"]


def test_https_registration_refusals(shared_hub):
    """The HTTPS device API answers a wrong ID scope 401, a TPM registration 400 and a body
    naming another registration 400, with DPS's JSON error body; no credential at all is 401
    before the body is read."""
    hub = shared_hub
    registration_id = unique_id("https-reg")
    r = dps_call(hub, "PUT", f"/enrollments/{registration_id}",
                 json={"registrationId": registration_id, "attestation": {"type": "symmetricKey"}})
    key = r.json()["attestation"]["symmetricKey"]["primaryKey"]
    base = f"https://127.0.0.1:{hub.dps['ports']['https']}"

    def register(scope: str, body: dict, token: bool = True) -> requests.Response:
        resource = urllib.parse.quote(f"{scope}/registrations/{registration_id}", safe="")
        se = str(int(time.time()) + 600)
        sig = base64.b64encode(hmac.new(base64.b64decode(key), f"{resource}\n{se}".encode(), hashlib.sha256).digest())
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = (f"SharedAccessSignature sr={resource}&sig={urllib.parse.quote(sig, safe='')}"
                                        f"&se={se}&skn=registration")
        return requests.put(f"{base}/{scope}/registrations/{registration_id}/register", params={"api-version": "2019-03-31"},
                            json=body, headers=headers, verify=hub.ca_path, timeout=10)

    scope = hub.dps["id_scope"]
    ok = register(scope, {"registrationId": registration_id})
    assert ok.status_code == 202 and ok.json()["status"] == "assigning", ok.text
    assert ok.headers["retry-after"] == "1"
    wrong_scope = register("0ne00FFFFFF", {"registrationId": registration_id})
    assert wrong_scope.status_code == 401 and wrong_scope.json()["errorCode"] == 401002, wrong_scope.text
    tpm = register(scope, {"registrationId": registration_id, "tpm": {"endorsementKey": "x"}})
    assert tpm.status_code == 400, tpm.text
    other = register(scope, {"registrationId": "someone-else"})
    assert other.status_code == 400, other.text
    assert register(scope, {"registrationId": registration_id}, token=False).status_code == 401
