"""X.509 devices signed by a CA (issue 12, `certificateAuthority`): a CA registered with the hub
is trusted only after proof of possession of its key; a device registered as
`certificateAuthority` then connects with a certificate that chains to it (directly or through
an intermediate it presents) and whose common name is its id. Removing the CA disconnects its
devices. Shown with `roost ca init` / `roost device create --x509 --ca`, with the REST calls
and `openssl` as IoT Hub's documentation has users prove possession, with the Python device
and service SDKs and the Node device and service SDKs (Mqtt, MqttWs, Http).
Refused, each counted by reason: a CA not verified, a certificate naming another device."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import requests
from azure.iot.device import Message

from conftest import call_with_timeout, shutdown_client, unique_id, wait_until
from test_x509 import connect, create_x509_device, refused

API = {"api-version": "2021-04-12"}


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def new_key_and_csr(cwd: Path, name: str, cn: str) -> None:
    openssl(cwd, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")


def sign(cwd: Path, name: str, issuer: str, extensions: str | None) -> None:
    """`openssl x509 -req`: `name`.csr signed by `issuer`.pem/.key; without `extensions`, a
    version 1 certificate, as IoT Hub's proof-of-possession walkthrough makes one."""
    args = ["x509", "-req", "-in", f"{name}.csr", "-CA", f"{issuer}.pem", "-CAkey", f"{issuer}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "30", "-sha256"]
    if extensions:
        (cwd / f"{name}.ext").write_text(extensions)
        args += ["-extfile", f"{name}.ext"]
    openssl(cwd, *args)


CA_EXT = "basicConstraints=critical,CA:true\nkeyUsage=critical,keyCertSign,cRLSign\n"
LEAF_EXT = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"


def self_signed(cwd: Path, name: str, cn: str, *extensions: str) -> None:
    """`name`.pem and `name`.key: a self-signed certificate for `cn` (`-addext` each of
    `extensions`)."""
    args = [arg for ext in extensions for arg in ("-addext", ext)]
    openssl(cwd, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={cn}", "-days", "30", *args)


def root_and_intermediate(cwd: Path, label: str) -> None:
    """A root CA (`root`.pem/.key) and an intermediate CA it signed (`inter`.pem/.key)."""
    self_signed(cwd, "root", f"{label} root", "basicConstraints=critical,CA:true",
                "keyUsage=critical,keyCertSign,cRLSign")
    new_key_and_csr(cwd, "inter", f"{label} intermediate")
    sign(cwd, "inter", "root", CA_EXT)


def issue_device(cwd: Path, cn: str, issuer: str, chain: list[str] = ()) -> tuple[str, str]:
    """A device certificate for `cn` signed by `issuer`; the file holds it, then `chain`."""
    name = f"dev-{cn.replace('/', '_')}"
    new_key_and_csr(cwd, name, cn)
    sign(cwd, name, issuer, LEAF_EXT)
    if chain:
        pem = cwd / f"{name}.pem"
        pem.write_text(pem.read_text() + "".join((cwd / f"{c}.pem").read_text() for c in chain))
    return str(cwd / f"{name}.pem"), str(cwd / f"{name}.key")


def rest(hub, method: str, path: str, **kw) -> requests.Response:
    return requests.request(method, f"{hub.service_url}/roost/certificates{path}", params=API,
                            headers=hub.service_headers(), verify=hub.ca_path, timeout=10, **kw)


def test_roost_ca_init_signs_devices_that_connect_until_the_ca_is_removed(shared_hub):
    hub = shared_hub
    name = unique_id("fleet")
    made = dict(line.split(": ", 1) for line in hub.cli("ca", "init", name).stdout.splitlines())
    assert made["verified"] == "true"
    assert Path(made["key"]).stat().st_mode & 0o077 == 0, "the CA's key is the owner's only"
    listed = {c["name"]: c for c in rest(hub, "GET", "").json()["value"]}
    assert listed[name]["properties"]["isVerified"] is True
    assert listed[name]["properties"]["thumbprint"] == made["thumbprint"]

    device_id = unique_id("x509ca")
    issued = create_x509_device(hub, device_id, "--ca", name)
    assert hub.show_device(device_id)["authentication"]["type"] == "certificateAuthority"
    client = connect(hub, device_id, issued["certificate"], issued["key"])
    try:
        call_with_timeout(client.send_message, Message("signed by the fleet CA", message_id="x509ca-1"),
                          what="send")
        records = {r["systemProperties"].get("message-id"): r for r in hub.records()
                   if r["systemProperties"].get("iothub-connection-device-id") == device_id}
        assert '"type":"x509CA"' in records["x509ca-1"]["systemProperties"]["iothub-connection-auth-method"]

        # Removing the CA ends the session, and the device is refused from then on.
        before = hub.metric_sum("roost_disconnects_total", reason="ca_revoked")
        hub.cli("ca", "remove", name)
        hub.wait_metric("roost_disconnects_total", lambda v: v >= before + 1, "the session closed",
                        timeout=15, reason="ca_revoked")
    finally:
        shutdown_client(client)
    refused(hub, device_id, issued["certificate"], issued["key"], "ca_not_verified")
    # Authentications are counted by the credential presented and their outcome.
    hub.wait_metric("roost_authentications_total", lambda v: v >= 1, "an x509 accepted",
                    method="x509", outcome="accepted", protocol="mqtt")
    hub.wait_metric("roost_authentications_total", lambda v: v >= 1, "an x509 refused",
                    method="x509", outcome="ca_not_verified", protocol="mqtt")


def test_proof_of_possession_over_rest_with_openssl_and_an_intermediate(shared_hub, tmp_path):
    hub = shared_hub
    root_and_intermediate(tmp_path, "roost test")
    name = unique_id("root")

    r = rest(hub, "PUT", f"/{name}", json={"properties": {"certificate": (tmp_path / "root.pem").read_text()}})
    assert r.status_code == 201, r.text
    described = r.json()
    assert described["name"] == name and described["properties"]["isVerified"] is False
    assert described["properties"]["subject"] == "CN=roost test root"
    # Trusting it on upload is not how a CA becomes trusted.
    r = rest(hub, "PUT", f"/{name}-2", json={"properties": {"certificate": (tmp_path / "root.pem").read_text(),
                                                              "isVerified": True}})
    assert r.status_code == 400, r.text

    # A device (registered by the Python service SDK) whose chain leads to the unverified CA.
    device_id = unique_id("x509inter")
    hub.registry_manager().create_device_with_certificate_authority(device_id, "enabled")
    cert, key = issue_device(tmp_path, device_id, "inter", chain=["inter"])
    refused(hub, device_id, cert, key, "ca_not_verified")

    code = rest(hub, "POST", f"/{name}/generateVerificationCode").json()["properties"]["verificationCode"]
    new_key_and_csr(tmp_path, "wrong", "not-the-code")
    sign(tmp_path, "wrong", "root", None)
    r = rest(hub, "POST", f"/{name}/verify", json={"certificate": (tmp_path / "wrong.pem").read_text()})
    assert r.status_code == 400 and "400004" in r.text and "verification code" in r.text, r.text
    new_key_and_csr(tmp_path, "proof", code)
    sign(tmp_path, "proof", "root", None)  # version 1, as `openssl x509 -req` makes it
    r = rest(hub, "POST", f"/{name}/verify", json={"certificate": (tmp_path / "proof.pem").read_text()})
    assert r.status_code == 200, r.text
    assert r.json()["properties"]["isVerified"] is True

    client = connect(hub, device_id, cert, key)
    try:
        call_with_timeout(client.send_message, Message("through an intermediate"), what="send")
    finally:
        shutdown_client(client)
    # Without the intermediate the chain does not reach the CA.
    alone = tmp_path / "alone.pem"
    alone.write_text(Path(cert).read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n")
    refused(hub, device_id, str(alone), key, "ca_not_verified")
    # A certificate the CA signed for another device is not this device's.
    other, other_key = issue_device(tmp_path, unique_id("someone-else"), "inter", chain=["inter"])
    refused(hub, device_id, other, other_key, "common_name_mismatch")
    assert rest(hub, "DELETE", f"/{name}").status_code == 204
    assert rest(hub, "GET", f"/{name}").status_code == 404


def test_the_node_device_sdk_with_a_ca_signed_certificate(shared_hub, tmp_path):
    from test_node import node_steps

    hub = shared_hub
    name = unique_id("nodefleet")
    made = dict(line.split(": ", 1) for line in hub.cli("ca", "init", name).stdout.splitlines())
    for ext in ("pem", "key"):
        (tmp_path / f"fleet.{ext}").write_text(Path(made["certificate" if ext == "pem" else "key"]).read_text())
    device_id = unique_id("x509canode")
    cert, key = issue_device(tmp_path, device_id, "fleet")
    steps = node_steps(hub, "device_x509.js", ROOST_DEVICE_ID=device_id, ROOST_CERT=cert, ROOST_KEY=key,
                       ROOST_X509_AUTH="certificateAuthority",
                       ROOST_HTTPS_PORT=str(hub.ports["https"]), ROOST_AMQP_PORT=str(hub.ports["amqp"]))
    assert len(steps) == 6, [s["step"] for s in steps]
    records = {r["systemProperties"].get("message-id"): r for r in hub.records()
               if r["systemProperties"].get("iothub-connection-device-id") == device_id}
    for mid in ("x509-node-mqtt", "x509-node-ws", "x509-node-amqp", "x509-node-amqpws", "x509-node-http"):
        assert '"type":"x509CA"' in records[mid]["systemProperties"]["iothub-connection-auth-method"]
    hub.cli("ca", "remove", name)


@pytest.mark.parametrize("body", ['{"properties": {}}', "junk", '{"properties": {"certificate": "junk"}}'])
def test_a_malformed_ca_upload_is_a_400(shared_hub, body):
    r = rest(shared_hub, "PUT", f"/{unique_id('bad')}", data=body)
    assert r.status_code == 400, r.text
