"""IoT Hub's service links over AMQP (issue 10, spec §4): the unmodified Python service SDK's
`IoTHubRegistryManager.send_c2d_message` (uamqp: SASL MSSBCBS, a ulong put-token id, the
`amqps://{host}/messages/devicebound` target) and the Node service SDK's `Client.send` and
feedback receiver queue cloud-to-device messages into the same durable queue as the REST send;
a device connected over MQTT receives them, and feedback arrives. Refusals: an unknown device,
a token signed with the wrong key."""

from __future__ import annotations

import contextlib
import json
import queue

import pytest

from conftest import unique_id, wait_until
from test_c2d import feedback
from test_node import node_steps


@contextlib.contextmanager
def uamqp_pointed(hub):
    """The SDK always dials port 5671 and trusts certifi's roots: point uamqp's token auth at
    the hub's test port and CA, nothing else."""
    import uamqp.authentication as auth

    original = auth.JWTTokenAuth.__init__

    def init(self, *args, **kwargs):
        kwargs.setdefault("port", hub.ports["amqp"])
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


def test_node_device_sdk_over_amqp(shared_hub):
    """The Node device SDK's Amqp transport: telemetry through the same device session as MQTT
    (in the events log with IoT Hub's properties), C2D complete / reject / abandon, a direct
    method, the twin, and a module."""
    hub = shared_hub
    device_id = unique_id("nodeamqpdev")
    steps = node_steps(hub, "device_amqp.js",
                       ROOST_DEVICE_ID=device_id,
                       ROOST_AMQP_PORT=str(hub.ports["amqp"]),
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
