"""IoT Hub's service and device links over AMQP (issue 10, spec §4–§5).

Service: the unmodified Python service SDK's `IoTHubRegistryManager.send_c2d_message` (uamqp:
SASL MSSBCBS, a ulong put-token id, the `amqps://{host}/messages/devicebound` target) and the
Node service SDK's `Client.send` and feedback receiver queue cloud-to-device messages into the
same durable queue as the REST send; a device connected over MQTT receives them, and feedback
arrives. Devices: the Node device SDK's Amqp transport (telemetry, C2D outcomes, methods, twin,
modules). Refusals, with raw frames where no SDK would send them: an unknown device, a wrong
key, an expired device token, a device token on a service link, a device attaching another
device's address; tokens that end detach their links unless renewed."""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import ssl
import sys
import time
from pathlib import Path

import pytest

from conftest import device_sas_token, parse_connection_string, service_sas_token, unique_id, wait_until

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
from gen_corpus import Described, Ulong, amqp_frame, perf, section  # noqa: E402
from test_c2d import feedback
from test_node import node_steps


@contextlib.contextmanager
def uamqp_pointed(hub, port: int | None = None):
    """The SDK always dials port 5671 and trusts certifi's roots: point uamqp's token auth at
    the hub's test port (or `port`) and CA, nothing else."""
    import uamqp.authentication as auth

    original = auth.JWTTokenAuth.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("port", port or hub.ports["amqp"])
        kwargs.setdefault("verify", str(hub.ca_path))
        original(self, *args, **kwargs)

    auth.JWTTokenAuth.__init__ = init
    try:
        yield
    finally:
        auth.JWTTokenAuth.__init__ = original


def registry_manager(hub, connection_string: str | None = None):
    from azure.iot.hub import IoTHubRegistryManager

    return IoTHubRegistryManager.from_connection_string(connection_string or hub.service_connection_string)


def test_python_send_c2d_message_reaches_an_mqtt_device_with_feedback(shared_hub):
    hub = shared_hub
    device_id = unique_id("pyamqp")
    client = hub.connected_client(hub.create_device(device_id))
    got: queue.Queue = queue.Queue()
    client.on_message_received = got.put
    with uamqp_pointed(hub):
        rm = registry_manager(hub)
        try:
            rm.send_c2d_message(device_id, "hello over amqp", {
                "iothub-ack": "full", "messageId": "py-amqp-1", "correlationId": "py-corr",
                "contentType": "text/plain", "contentEncoding": "utf-8", "colour": "red"})
            # The connection stays open between calls, as the SDK keeps it.
            rm.send_c2d_message(device_id, "second", {})
            with pytest.raises(Exception, match="C2D message send failure"):
                rm.send_c2d_message(f"{device_id}-nope", "to nobody", {})
        finally:
            rm.amqp_svc_client.disconnect_sync()
    m = got.get(timeout=10)
    assert m.data == b"hello over amqp"
    assert m.message_id == "py-amqp-1" and m.correlation_id == "py-corr"
    assert m.content_type == "text/plain" and m.content_encoding == "utf-8"
    assert m.custom_properties["colour"] == "red"
    assert m.ack == "full"
    assert got.get(timeout=10).data == b"second"

    def success():
        records, _ = feedback(hub)
        return [r for r in records if r["originalMessageId"] == "py-amqp-1"] or None

    (record,) = wait_until(success, 10, "a Success feedback record")
    assert record["statusCode"] == "Success" and record["deviceId"] == device_id
    assert hub.metric_sum("roost_amqp_links_total", kind="c2d_sender") >= 1
    assert hub.metric_sum("roost_amqp_service_calls_total", op="c2d_send", result="ok") >= 2
    assert hub.metric_sum("roost_amqp_service_calls_total", op="c2d_send", result="404") >= 1


def test_a_service_token_signed_with_the_wrong_key_is_refused(shared_hub):
    hub = shared_hub
    parts = dict(p.split("=", 1) for p in hub.service_connection_string.split(";"))
    parts["SharedAccessKey"] = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk="
    wrong = ";".join(f"{k}={v}" for k, v in parts.items())
    device_id = unique_id("pyamqp")
    hub.create_device(device_id)
    with uamqp_pointed(hub):
        rm = registry_manager(hub, wrong)
        try:
            with pytest.raises(Exception):
                rm.send_c2d_message(device_id, "never", {})
        finally:
            rm.amqp_svc_client.disconnect_sync()
    assert hub.show_device(device_id)["cloudToDeviceMessageCount"] == 0
    assert hub.metric_sum("roost_amqp_cbs_put_tokens_total", result="bad_signature") >= 1


def test_node_client_send_and_feedback_receiver(shared_hub):
    hub = shared_hub
    steps = node_steps(hub, "service_amqp.js",
                       ROOST_DEVICE_ID=unique_id("nodeamqp"),
                       ROOST_AMQP_PORT=str(hub.ports["amqp"]),
                       NODE_EXTRA_CA_CERTS=str(hub.ca_path))
    by_name = {s["step"]: s["detail"] for s in steps}
    assert by_name["Client.send reaches the device with its properties"]["messageId"] == "node-c2d-1"
    assert by_name["the feedback receiver gets the Success record"] == "Success"
    assert by_name["Client.send to an unknown device is DeviceNotFoundError"] == "DeviceNotFoundError"


@pytest.mark.parametrize("transport", ["Amqp", "AmqpWs"])
def test_node_device_sdk_over_amqp(shared_hub, transport):
    """The Node device SDK's Amqp transport, and AmqpWs (AMQP in WebSockets on the hub's port
    443 listener, tunnelled to the same AMQP connection code): telemetry through the same
    device session as MQTT (in the events log with IoT Hub's properties), C2D complete /
    reject / abandon, a direct method, the twin, and a module."""
    hub = shared_hub
    device_id = unique_id("nodeamqpdev")
    steps = node_steps(hub, "device_amqp.js",
                       ROOST_DEVICE_ID=device_id,
                       ROOST_AMQP_PORT=str(hub.ports["amqp"]),
                       ROOST_HTTPS_PORT=str(hub.ports["https"]),
                       ROOST_TRANSPORT=transport,
                       NODE_EXTRA_CA_CERTS=str(hub.ca_path))
    by_name = {s["step"]: s["detail"] for s in steps}
    assert by_name["a direct method is answered over AMQP"]["payload"] == {"echo": {"n": 3}}
    records = [r for r in hub.records() if r["systemProperties"].get("iothub-connection-device-id") == device_id
               and r["systemProperties"]["iothub-message-source"] == "Telemetry"]
    (telemetry,) = [r for r in records if r["systemProperties"].get("message-id") == "amqp-telemetry-1"]
    assert telemetry["systemProperties"]["content-type"] == "application/json"
    assert telemetry["properties"]["level"] == "critical"
    assert json.loads(telemetry["body"]) == {"temperature": 21.5}
    (from_module,) = [r for r in records if r["systemProperties"].get("message-id") == "amqp-module-1"]
    assert from_module["systemProperties"]["iothub-connection-module-id"] == "amqpmod"
    assert hub.metric_sum("roost_amqp_links_total", kind="device_telemetry") >= 2
    if transport == "AmqpWs":
        assert hub.metric_sum("roost_websocket_upgrades_total", result="amqp-ws") >= 2
    # The device session's series carry the protocol it came by: the device and its module.
    protocol = {"Amqp": "amqp", "AmqpWs": "amqp-ws"}[transport]
    hub.wait_metric("roost_connections_accepted_total", lambda v: v >= 2, f"{protocol} sessions", protocol=protocol)
    hub.wait_metric("roost_messages_in_total", lambda v: v >= 2, f"{protocol} telemetry", protocol=protocol)


class RawAmqp:
    """A bare AMQP connection (no SASL, as the Node SDKs open it) with the frames written by the
    fuzz seed generator's own encoder; answers are searched for as bytes."""

    def __init__(self, hub):
        ctx = ssl.create_default_context(cafile=hub.ca_path)
        raw = socket.create_connection(("127.0.0.1", hub.ports["amqp"]), timeout=10)
        self.sock = ctx.wrap_socket(raw, server_hostname=hub.hostname)
        self.got = b""
        self.next_delivery = 0
        self.sock.sendall(b"AMQP\x00\x01\x00\x00" + amqp_frame(perf(0x10, ["raw", hub.hostname]))
                          + amqp_frame(perf(0x11, [None, 0, 100, 100])))
        # $cbs: a sender (handle 0) and a receiver (handle 1) with credit; transfers wait for
        # the server's credit (one sent before it closes the connection).
        self.attach_sender(0, "$cbs")
        self.attach(1, "$cbs", receiver=True)
        self.sock.sendall(amqp_frame(perf(0x13, [0, 100, 0, 100, 1, 0, 100])))

    def attach_sender(self, handle: int, address: str) -> None:
        """Attaches a sender and waits for the server's credit on it (a FLOW)."""
        flows = self.got.count(b"\x00S\x13")
        self.attach(handle, address)
        self._until(lambda: self.got.count(b"\x00S\x13") > flows, f"credit for {address}", 10)

    def _until(self, done, what: str, timeout: float) -> None:
        """Reads until `done()` holds; fails after `timeout` or when the server closes."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            assert left > 0, f"no {what}; got {self.got[-600:]!r}"
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            assert chunk, f"closed before {what}; got {self.got[-600:]!r}"
            self.got += chunk

    def attach(self, handle: int, address: str, receiver: bool = False) -> None:
        terminus = [Described(Ulong(0x28), ["me"]), Described(Ulong(0x29), [address])]
        if receiver:
            terminus = [Described(Ulong(0x28), [address]), Described(Ulong(0x29), ["me"])]
        fields = [f"link-{handle}", handle, receiver, None, None, *terminus]
        if not receiver:
            fields += [None, None, 0]
        self.sock.sendall(amqp_frame(perf(0x12, fields)))

    def transfer(self, handle: int, payload: bytes) -> None:
        did = self.next_delivery
        self.next_delivery += 1
        self.sock.sendall(amqp_frame(perf(0x14, [handle, did, did.to_bytes(4, "big"), 0, False, False]) + payload))

    def put_token(self, token: str) -> None:
        self.transfer(0, section(0x73, [f"put-{self.next_delivery}"])
                      + section(0x74, {"operation": "put-token", "type": "servicebus.windows.net:sastoken",
                                       "name": "any"})
                      + section(0x77, token))

    def wait_for(self, needle: bytes, timeout: float = 10) -> None:
        self._until(lambda: needle in self.got, repr(needle), timeout)

    def close(self) -> None:
        self.sock.close()


def device_key(conn_str: str) -> str:
    return parse_connection_string(conn_str)["SharedAccessKey"]


def test_device_tokens_are_checked_and_scoped_to_their_own_device(shared_hub):
    hub = shared_hub
    a, b = unique_id("rawa"), unique_id("rawb")
    key_a = device_key(hub.create_device(a))
    hub.create_device(b)
    c = RawAmqp(hub)
    try:
        c.put_token(device_sas_token(hub.hostname, a, key_a, ttl=-600))
        c.wait_for(b"the device token was refused: token_expired")
        c.put_token(device_sas_token(hub.hostname, a, key_a))
        c.wait_for(b"\xa1\x02OK")
        # Another device's address, and a service node, with a device's token: refused.
        c.attach(2, f"/devices/{b}/messages/events")
        c.wait_for(f'no put-token on this connection authenticated "{b}"'.encode())
        c.attach(3, "/messages/devicebound")
        c.wait_for(b"grants ServiceConnect")
        # Its own telemetry goes.
        c.attach_sender(4, f"/devices/{a}/messages/events")
        c.transfer(4, section(0x73, ["raw-telemetry-1"]) + section(0x75, b"from a raw client"))
        wait_until(lambda: any(r["systemProperties"].get("message-id") == "raw-telemetry-1"
                               and r["systemProperties"].get("iothub-connection-device-id") == a
                               for r in hub.records()), 10, "the raw client's telemetry in the log")
    finally:
        c.close()


def test_a_device_tokens_expiry_ends_its_links_unless_renewed(shared_hub):
    hub = shared_hub
    ending, renewed = unique_id("rawexp"), unique_id("rawren")
    keys = {d: device_key(hub.create_device(d)) for d in (ending, renewed)}
    conns = {d: RawAmqp(hub) for d in keys}
    try:
        for d, c in conns.items():
            c.put_token(device_sas_token(hub.hostname, d, keys[d], ttl=3))
            c.wait_for(b"\xa1\x02OK")
            c.attach_sender(2, f"/devices/{d}/messages/events")
        conns[renewed].put_token(device_sas_token(hub.hostname, renewed, keys[renewed], ttl=3600))
        conns[ending].wait_for(b"the device session ended: token_expired", timeout=15)
        time.sleep(1)
        renewed_conn = conns[renewed]
        renewed_conn.transfer(2, section(0x73, ["after-renewal"]) + section(0x75, b"still here"))
        wait_until(lambda: any(r["systemProperties"].get("message-id") == "after-renewal"
                               for r in hub.records()), 10, "telemetry after the renewal")
        assert b"the device session ended" not in renewed_conn.got
    finally:
        for c in conns.values():
            c.close()


def test_a_policy_tokens_expiry_detaches_its_service_links(shared_hub):
    hub = shared_hub
    c = RawAmqp(hub)
    try:
        c.put_token(service_sas_token(hub.hostname, "iothubowner", hub.owner_key, ttl=3))
        c.wait_for(b"\xa1\x02OK")
        c.attach(2, "/messages/serviceBound/feedback", receiver=True)
        c.wait_for(b"expired and was not renewed", timeout=15)
    finally:
        c.close()
    assert hub.metric_sum("roost_amqp_refused_total", reason="token_expired") >= 1


def test_the_sdks_frames_through_a_recording_proxy(shared_hub):
    """The official SDKs' own frames, recorded by a TLS-terminating proxy (amqp_capture.py):
    the Event Hubs client, the service SDK's C2D send and the Node device SDK each work through
    it, and each recorded stream starts with the protocol header that SDK uses (SASL for the
    Python clients, bare AMQP for Node). With ROOST_CAPTURE_DIR set, the streams are written
    there: that is how fuzz/corpus/amqp_frame/sdk_* were made."""
    import os

    from amqp_capture import CapturingProxy
    from azure.eventhub import EventHubConsumerClient, TransportType

    hub = shared_hub
    proxy = CapturingProxy(hub)
    try:
        device_id = unique_id("capture")
        conn_str = hub.create_device(device_id)
        eh = EventHubConsumerClient.from_connection_string(
            hub.info["eventhubs_connection_string"], consumer_group="$Default",
            custom_endpoint_address=f"sb://{hub.hostname}:{proxy.port}", transport_type=TransportType.Amqp,
            connection_verify=hub.ca_path, retry_total=0)
        with eh:
            assert eh.get_partition_ids() == ["0", "1"]
        with uamqp_pointed(hub, proxy.port):
            rm = registry_manager(hub)
            try:
                rm.send_c2d_message(device_id, "captured", {"iothub-ack": "full"})
            finally:
                rm.amqp_svc_client.disconnect_sync()
        node_steps(hub, "device_amqp_send.js",
                   ROOST_DEVICE_CS=f"{conn_str};GatewayHostName=localhost:{proxy.port}",
                   NODE_EXTRA_CA_CERTS=str(hub.ca_path))
        wait_until(lambda: len(proxy.recorded()) >= 3, 10, "three recorded connections")
        streams = proxy.recorded()
    finally:
        proxy.close()
    sasl, plain = b"AMQP\x03\x01\x00\x00", b"AMQP\x00\x01\x00\x00"
    by_client = {
        "sdk_py_eventhub": [s for s in streams if s.startswith(sasl) and b"ANONYMOUS" in s[:64]],
        "sdk_py_hub_c2d": [s for s in streams if s.startswith(sasl) and b"MSSBCBS" in s[:64]],
        "sdk_node_device": [s for s in streams if s.startswith(plain)],
    }
    assert all(by_client.values()), {k: len(v) for k, v in by_client.items()}
    assert not any(b"sig=" in s and b"sig=AAAA" not in s for s in streams), "signatures blanked"
    out = os.environ.get("ROOST_CAPTURE_DIR")
    if out:
        for name, found in by_client.items():
            for i, stream in enumerate(found):
                Path(out, f"{name}_{i}").write_bytes(stream)
