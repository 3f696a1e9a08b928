"""X.509 devices (issue 12, self-signed part): a device registered with a certificate
thumbprint (`roost device create ID --x509`, the Python service SDK's
`create_device_with_x509`, the Node `Registry.create`) connects with the unmodified Python
device SDK's `create_from_x509_certificate` and the Node device SDK's `x509=true` — a client
certificate in the TLS handshake, no password in CONNECT — on the same ports as SAS devices
(8883, and 443 in WebSockets).
Refused, each counted by reason: a certificate whose thumbprint is not the device's, an
expired one, a certificate for a SAS device."""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path

import pytest
from azure.iot.device import Message

from conftest import call_with_timeout, redirect_mqtt_to, shutdown_client, unique_id, wait_until


def create_x509_device(hub, device_id: str, *extra: str) -> dict:
    """`roost device create ID --x509 …`: the lines it prints, by name (`connection_string`,
    `certificate`, `key`, `thumbprint`)."""
    out = hub.cli("device", "create", device_id, "--x509", *extra).stdout.splitlines()
    got = {"connection_string": out[0]}
    for line in out[1:]:
        name, _, value = line.partition(": ")
        got[name] = value
    return got


def der_of(pem_path: str) -> bytes:
    body = "".join(ln for ln in Path(pem_path).read_text().splitlines() if not ln.startswith("-----"))
    return base64.b64decode(body)


def x509_client(hub, device_id: str, cert: str, key: str, websockets: bool = False):
    from azure.iot.device import X509, IoTHubDeviceClient

    redirect_mqtt_to(hub.mqtt_port, hub.ports["https"])
    return IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(cert_file=cert, key_file=key), hostname=hub.hostname, device_id=device_id,
        server_verification_cert=hub.ca_pem, connection_retry=False, websockets=websockets)


def connect(hub, device_id: str, cert: str, key: str, timeout: float = 15, websockets: bool = False):
    """A connected client; a device just created reaches the engine asynchronously, so a
    refusal is retried until `timeout`."""
    from azure.iot.device.exceptions import CredentialError

    def attempt():
        client = x509_client(hub, device_id, cert, key, websockets)
        try:
            call_with_timeout(client.connect, what="x509 connect")
            return client
        except CredentialError:
            shutdown_client(client)
            return None

    return wait_until(attempt, timeout, f"{device_id} to connect with its certificate", interval=0.3)


def refused(hub, device_id: str, cert: str, key: str, reason: str) -> None:
    """The connect is refused (the SDK's CredentialError), counted with `reason` — once the
    engine knows the device (until then it is `unknown_device`, and is tried again)."""
    from azure.iot.device.exceptions import CredentialError

    def attempt() -> bool:
        before = hub.metric_sum("roost_connect_refused_total", reason=reason, protocol="mqtt")
        client = x509_client(hub, device_id, cert, key)
        try:
            with pytest.raises(CredentialError):
                call_with_timeout(client.connect, what="refused x509 connect")
        finally:
            shutdown_client(client)
        try:
            hub.wait_metric("roost_connect_refused_total", lambda v: v >= before + 1, f"refused: {reason}",
                            timeout=2, reason=reason, protocol="mqtt")
            return True
        except AssertionError:
            return False

    wait_until(attempt, 20, f"{device_id} refused as {reason}", interval=0.2)


def test_a_self_signed_device_connects_with_its_certificate(shared_hub):
    hub = shared_hub
    device_id = unique_id("x509")
    made = create_x509_device(hub, device_id)
    assert made["connection_string"] == f"HostName={hub.hostname};DeviceId={device_id};x509=true"
    assert Path(made["key"]).stat().st_mode & 0o077 == 0, "the key is the owner's only"
    assert made["thumbprint"] == hashlib.sha256(der_of(made["certificate"])).hexdigest().upper()
    shown = hub.show_device(device_id)["authentication"]
    assert shown["type"] == "selfSigned"
    assert shown["x509Thumbprint"]["primaryThumbprint"] == made["thumbprint"]

    client = connect(hub, device_id, made["certificate"], made["key"])
    try:
        call_with_timeout(client.send_message, Message("by certificate", message_id="x509-1"), what="send")
        twin = call_with_timeout(client.get_twin, what="get_twin")
        assert "desired" in twin
    finally:
        shutdown_client(client)
    # The same certificate over MQTT in WebSockets (port 443).
    client = connect(hub, device_id, made["certificate"], made["key"], websockets=True)
    try:
        call_with_timeout(client.send_message, Message("by certificate, over 443", message_id="x509-2"), what="send")
    finally:
        shutdown_client(client)
    hub.wait_metric("roost_connections_accepted_total", lambda v: v >= 1, "an mqtt-ws session", protocol="mqtt-ws")
    records = {r["systemProperties"].get("message-id"): r for r in hub.records()
               if r["systemProperties"].get("iothub-connection-device-id") == device_id}
    for mid in ("x509-1", "x509-2"):
        assert '"type":"x509Certificate"' in records[mid]["systemProperties"]["iothub-connection-auth-method"]


def test_the_node_device_sdk_with_a_certificate_over_mqtt_websockets_and_http(shared_hub):
    from test_node import node_steps

    hub = shared_hub
    issued = create_x509_device(hub, unique_id("x509nodesrc"))
    device_id = unique_id("x509node")
    steps = node_steps(hub, "device_x509.js", ROOST_DEVICE_ID=device_id, ROOST_CERT=issued["certificate"],
               ROOST_KEY=issued["key"], ROOST_THUMBPRINT=issued["thumbprint"],
               ROOST_HTTPS_PORT=str(hub.ports["https"]), ROOST_AMQP_PORT=str(hub.ports["amqp"]))
    records = {r["systemProperties"].get("message-id"): r for r in hub.records()
               if r["systemProperties"].get("iothub-connection-device-id") == device_id}
    assert len(steps) == 6, [s["step"] for s in steps]
    for mid in ("x509-node-mqtt", "x509-node-ws", "x509-node-amqp", "x509-node-amqpws", "x509-node-http"):
        assert '"type":"x509Certificate"' in records[mid]["systemProperties"]["iothub-connection-auth-method"]
    assert hub.registry_manager().get_twin(device_id).properties.reported["via"] == "x509-node-amqpws"


def test_a_thumbprint_registered_by_the_service_sdk_in_sha1_lowercase(shared_hub):
    """The service SDK's `create_device_with_x509` with a SHA-1 thumbprint, in lowercase: any
    certificate with that thumbprint is the device's (a self-signed identity is its
    thumbprint, whatever the certificate's name)."""
    hub = shared_hub
    issued = create_x509_device(hub, unique_id("x509src"))
    sha1 = hashlib.sha1(der_of(issued["certificate"])).hexdigest()
    device_id = unique_id("x509sha1")
    rm = hub.registry_manager()
    rm.create_device_with_x509(device_id, sha1, None, "enabled")
    assert rm.get_device(device_id).authentication.type == "selfSigned"
    client = connect(hub, device_id, issued["certificate"], issued["key"])
    shutdown_client(client)


def test_certificates_that_do_not_prove_the_identity_are_refused(shared_hub):
    hub = shared_hub
    mine = create_x509_device(hub, unique_id("x509a"))
    # Registered with another certificate's thumbprint.
    other_id = unique_id("x509b")
    create_x509_device(hub, other_id, "--thumbprint", "AB" * 32)
    wait_until(lambda: hub.show_device(other_id)["authentication"]["type"] == "selfSigned", 10, "registered")
    refused(hub, other_id, mine["certificate"], mine["key"], "thumbprint_mismatch")
    # Its own certificate, expired.
    expired_id = unique_id("x509old")
    expired = create_x509_device(hub, expired_id, "--valid-days", "0")
    time.sleep(1.5)  # valid until the end of the second it was issued in
    refused(hub, expired_id, expired["certificate"], expired["key"], "certificate_expired")
    # A SAS device is not authenticated by a certificate.
    sas_id = unique_id("x509sas")
    hub.create_device(sas_id)
    refused(hub, sas_id, mine["certificate"], mine["key"], "not_x509_identity")
