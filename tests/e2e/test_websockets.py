"""Port 443 (issue 11): the hub's `https` listener tells its protocols apart by the request
head. The service SDKs (Python `IoTHubRegistryManager`, Node `azure-iothub`) reach the service
API there with nothing but the connection string and a trusted CA. The HTTPS device API — telemetry (single messages and batches, kept-alive connections,
every error path) and C2D with lock tokens — is driven with raw requests. The unmodified Python device SDK with `websockets=True` (paho's MQTT over a WebSocket at
`/$iothub/websocket`, subprotocol `mqtt`) sends telemetry, reads and patches its twin,
receives desired changes, answers a direct method and receives C2D — through the same MQTT
adapter and device session as port 8883. Upgrades the hub does not serve are refused with
their status, and a plain request gets IoT Hub's error body."""

from __future__ import annotations

import json
import queue
import socket
import ssl
import time

from azure.iot.device import Message, MethodResponse
from azure.iot.hub.models import Twin, TwinProperties

from conftest import call_with_timeout, unique_id, wait_until
from test_c2d import send_c2d
from test_methods import invoke, wait_subscribed


def test_the_python_device_sdk_over_websockets(shared_hub):
    hub = shared_hub
    device_id = unique_id("ws")
    client = hub.connected_client(hub.create_device(device_id), websockets=True)
    assert hub.metric_sum("roost_websocket_upgrades_total", result="mqtt-ws") >= 1

    # Telemetry, acknowledged (QoS 1) and in the log with its properties.
    m = Message('{"over":"websockets"}', message_id="ws-1", content_encoding="utf-8",
                content_type="application/json")
    m.custom_properties["path"] = "443"
    call_with_timeout(client.send_message, m, what="send over WebSockets")
    records = [r for r in hub.records()
               if r["systemProperties"].get("iothub-connection-device-id") == device_id
               and r["systemProperties"].get("message-id") == "ws-1"]
    assert len(records) == 1 and records[0]["properties"]["path"] == "443"
    assert json.loads(records[0]["body"]) == {"over": "websockets"}
    hub.wait_metric("roost_connections_accepted_total", lambda v: v >= 1, "an mqtt-ws session", protocol="mqtt-ws")
    hub.wait_metric("roost_messages_in_total", lambda v: v >= 1, "mqtt-ws telemetry", protocol="mqtt-ws")

    # Twin: read, report, and a desired change pushed.
    twin = call_with_timeout(client.get_twin, what="get_twin")
    assert "desired" in twin and "reported" in twin
    call_with_timeout(client.patch_twin_reported_properties, {"transport": "ws"}, what="report")
    rm = hub.registry_manager()
    assert rm.get_twin(device_id).properties.reported["transport"] == "ws"
    patches: queue.Queue = queue.Queue()
    client.on_twin_desired_properties_patch_received = patches.put
    time.sleep(1.0)  # setting the handler subscribes asynchronously
    rm.update_twin(device_id, Twin(properties=TwinProperties(desired={"rate": 3})), "*")
    assert patches.get(timeout=10)["rate"] == 3

    # A direct method, answered.
    def handler(req):
        client.send_method_response(MethodResponse.create_from_method_request(req, 200, {"via": "ws"}))

    client.on_method_request_received = handler
    wait_subscribed(hub, rm, device_id)
    answer = invoke(rm, device_id, "where", None)
    assert answer.status == 200 and answer.payload == {"via": "ws"}

    # Cloud-to-device, completed by the SDK's PUBACK.
    got: queue.Queue = queue.Queue()
    client.on_message_received = got.put
    time.sleep(1.0)
    assert send_c2d(hub, device_id, b"to a websocket", {"iothub-messageid": "ws-c2d"}).status_code == 204
    c2d = got.get(timeout=10)
    assert c2d.data == b"to a websocket" and c2d.message_id == "ws-c2d"
    wait_until(lambda: hub.show_device(device_id)["cloudToDeviceMessageCount"] == 0, 10, "completed")


def raw_request(hub, request: bytes) -> bytes:
    ctx = ssl.create_default_context(cafile=hub.ca_path)
    with socket.create_connection(("127.0.0.1", hub.ports["https"]), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=hub.hostname) as s:
            s.sendall(request)
            got = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return got
                got += chunk


def test_what_port_443_does_not_serve_is_refused_with_its_status(shared_hub):
    hub = shared_hub
    upgrade = ("GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n"
               "Sec-WebSocket-Protocol: {protocol}\r\n\r\n")
    cases = [
        (upgrade.format(path="/$iothub/websocket", version=13, protocol="chat"), b"HTTP/1.1 400 ", b"no subprotocol"),
        (upgrade.format(path="/$iothub/websocket", version=8, protocol="mqtt"), b"HTTP/1.1 426 ", b"Sec-WebSocket-Version: 13"),
        (upgrade.format(path="/elsewhere", version=13, protocol="mqtt"), b"HTTP/1.1 404 ", b"no WebSocket"),
        ("GET /devices/x/messages/deviceBound HTTP/1.1\r\nHost: localhost\r\n\r\n", b"HTTP/1.1 401 ", b"ErrorCode:IotHubUnauthorizedAccess"),
        # The service API's paths are control's: a twin read without a token is 401 there.
        ("GET /twins/x HTTP/1.1\r\nHost: localhost\r\n\r\n", b"HTTP/1.1 401 ", b"iothub-errorcode: IotHubUnauthorized"),
        # Refused from the head: nothing of the announced body is read.
        ("PUT /devices/x?api-version=2021-04-12 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 900000\r\n"
         "Authorization: SharedAccessSignature sr=localhost&sig=AAAA&se=9999999999&skn=iothubowner\r\n\r\n",
         b"HTTP/1.1 401 ", b"Connection: close"),
        ("GET / HTTP/1.1\r\nHost: localhost\r\nX: " + "a" * 9000 + "\r\n\r\n", b"HTTP/1.1 431 ", b"ErrorCode:BadRequest"),
    ]
    for request, status, detail in cases:
        got = raw_request(hub, request.encode())
        assert got.startswith(status) and detail in got, (request[:60], got[:300])
    # A good upgrade is answered 101 with the accept key of RFC 6455 and the subprotocol echoed.
    ctx = ssl.create_default_context(cafile=hub.ca_path)
    with socket.create_connection(("127.0.0.1", hub.ports["https"]), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=hub.hostname) as s:
            s.sendall(upgrade.format(path="/$iothub/websocket", version=13, protocol="mqtt").encode())
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
    assert b"Sec-WebSocket-Protocol: mqtt\r\n" in head
    assert hub.metric_sum("roost_websocket_upgrades_total", result="no_subprotocol") >= 1
    assert hub.metric_sum("roost_https_requests_total", route="device", status="401") >= 1


def test_the_event_hubs_client_over_websockets(shared_hub):
    """`azure-eventhub` with `TransportType.AmqpOverWebsocket` (`/$servicebus/websocket`,
    subprotocol AMQPWSB10) reads the built-in endpoint through port 443."""
    from azure.eventhub import EventHubConsumerClient, TransportType

    hub = shared_hub
    device_id = unique_id("wseh")
    client = hub.connected_client(hub.create_device(device_id))
    call_with_timeout(client.send_message, Message("over the tunnel", message_id="wseh-1"), what="send")
    mine = [r for r in hub.records() if r["systemProperties"].get("message-id") == "wseh-1"]
    partition = str(mine[0]["partition"])
    consumer = EventHubConsumerClient.from_connection_string(
        hub.info["eventhubs_connection_string"], consumer_group="$Default",
        custom_endpoint_address=f"sb://{hub.hostname}:{hub.ports['https']}",
        transport_type=TransportType.AmqpOverWebsocket, connection_verify=hub.ca_path, retry_total=0)
    got: list = []

    def on_event(_ctx, event):
        if event is not None and event.message_id == "wseh-1":
            got.append(event)

    import threading

    worker = threading.Thread(target=consumer.receive, daemon=True, kwargs=dict(
        on_event=on_event, partition_id=partition, starting_position="-1"))
    with consumer:
        assert consumer.get_partition_ids() == ["0", "1"]
        worker.start()
        wait_until(lambda: got, 30, "the event read over WebSockets")
    assert got[0].body_as_str() == "over the tunnel"
    assert hub.metric_sum("roost_websocket_upgrades_total", result="amqp-ws") >= 1


def test_the_node_device_sdk_over_mqtt_websockets(shared_hub):
    """The Node device SDK's MqttWs transport through port 443: telemetry, twin, method, C2D."""
    from test_node import node_steps

    hub = shared_hub
    device_id = unique_id("nodews")
    node_steps(hub, "device_mqtt_ws.js", ROOST_DEVICE_ID=device_id,
               ROOST_HTTPS_PORT=str(hub.ports["https"]), ROOST_AMQP_PORT=str(hub.ports["amqp"]),
               NODE_EXTRA_CA_CERTS=str(hub.ca_path))
    (record,) = [r for r in hub.records() if r["systemProperties"].get("message-id") == "mqttws-1"]
    assert record["systemProperties"]["iothub-connection-device-id"] == device_id
    assert record["properties"]["transport"] == "MqttWs"


def https(hub):
    import http.client

    ctx = ssl.create_default_context(cafile=hub.ca_path)
    conn = http.client.HTTPSConnection("127.0.0.1", hub.ports["https"], context=ctx, timeout=10)
    conn._context.check_hostname = False  # the certificate names the hub's host, not 127.0.0.1
    return conn


def test_the_https_device_api_takes_telemetry(shared_hub):
    import base64

    from conftest import device_sas_token, parse_connection_string

    hub = shared_hub
    device_id = unique_id("http")
    key = parse_connection_string(hub.create_device(device_id))["SharedAccessKey"]
    token = device_sas_token(hub.hostname, device_id, key)
    path = f"/devices/{device_id}/messages/events?api-version=2021-04-12"
    conn = https(hub)
    # One message, its properties in headers; then a batch on the same (kept-alive) connection.
    deadline = time.monotonic() + 10
    while True:  # a device just created reaches the engine's registry replica asynchronously
        conn.request("POST", path, body=b'{"t":1}', headers={
            "Authorization": token, "iothub-messageid": "http-1", "iothub-app-level": "warn",
            "iothub-contenttype": "application/json", "iothub-contentencoding": "utf-8"})
        r = conn.getresponse()
        r.read()
        if r.status != 401 or time.monotonic() > deadline:
            break
        conn = https(hub)
        time.sleep(0.2)
    assert r.status == 204, r.status
    batch = json.dumps([
        {"body": base64.b64encode(b"first").decode(), "properties": {"iothub-app-n": "1", "iothub-messageid": "http-b1"}},
        {"body": "second", "base64Encoded": False, "properties": {"iothub-messageid": "http-b2"}},
    ])
    conn.request("POST", path, body=batch, headers={
        "Authorization": token, "Content-Type": "application/vnd.microsoft.iothub.json"})
    r = conn.getresponse()
    r.read()
    assert r.status == 204
    conn.close()
    records = {r["systemProperties"].get("message-id"): r for r in hub.records()
               if r["systemProperties"].get("iothub-connection-device-id") == device_id}
    assert json.loads(records["http-1"]["body"]) == {"t": 1}
    assert records["http-1"]["properties"]["level"] == "warn"
    assert records["http-1"]["systemProperties"]["content-type"] == "application/json"
    assert records["http-b1"]["body"] == "first" and records["http-b1"]["properties"]["n"] == "1"
    assert records["http-b2"]["body"] == "second"
    hub.wait_metric("roost_messages_in_total", lambda v: v >= 3, "HTTPS telemetry counted", protocol="https")

    def status_of(method, target, headers, body=None):
        c = https(hub)
        c.request(method, target, body=body, headers=headers)
        resp = c.getresponse()
        text = resp.read()
        c.close()
        return resp.status, resp.getheader("iothub-errorcode"), text

    # Every error path, with IoT Hub's error code.
    assert status_of("POST", path, {})[:2] == (401, "IotHubUnauthorizedAccess")
    other = unique_id("httpx")
    assert status_of("POST", f"/devices/{other}/messages/events", {"Authorization": token})[:2] == \
        (401, "IotHubUnauthorizedAccess"), "another device's path with this token"
    bad = token.replace("sig=", "sig=AAAA")
    assert status_of("POST", path, {"Authorization": bad})[0] == 401
    assert status_of("GET", path, {"Authorization": token})[:2] == (405, "MethodNotAllowed")
    assert status_of("POST", path, {"Authorization": token, "Content-Type": "application/vnd.microsoft.iothub.json"},
                     b"not json")[:2] == (400, "ArgumentInvalid")
    assert status_of("GET", "/nothing/here", {})[:2] == (404, "NotFound")
    # Refused from the head, before any of the body is sent: a bad token (401), and a body
    # announced over the limit (413).
    ctx = ssl.create_default_context(cafile=hub.ca_path)
    for auth, status in (("SharedAccessSignature sr=x&sig=y&se=1", b"HTTP/1.1 401 "), (token, b"HTTP/1.1 413 ")):
        with socket.create_connection(("127.0.0.1", hub.ports["https"]), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=hub.hostname) as s:
                s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n"
                          f"Content-Length: 1000000\r\n\r\n".encode())
                answer = s.recv(4096)
                assert answer.startswith(status), answer[:200]
    # A client that sends its whole oversize body before reading (as http.client does) gets to
    # read the 413: the hub drops what it sends (up to 1 MiB) instead of resetting it.
    big = https(hub)
    big.request("POST", path, body=b"x" * 600_000, headers={"Authorization": token})
    r = big.getresponse()
    assert (r.status, r.getheader("iothub-errorcode")) == (413, "RequestEntityTooLarge")
    big.close()


def test_cloud_to_device_over_https(shared_hub):
    """C2D with the HTTPS device API: GET takes the oldest message with its lock token as the
    ETag, DELETE completes it, DELETE ?reject dead-letters it, POST …/abandon gives it back;
    a lock no message holds is 412 DeviceMessageLockLost; feedback follows each outcome."""
    from conftest import device_sas_token, parse_connection_string
    from test_c2d import feedback

    hub = shared_hub
    device_id = unique_id("httpc2d")
    key = parse_connection_string(hub.create_device(device_id))["SharedAccessKey"]
    token = device_sas_token(hub.hostname, device_id, key)
    base = f"/devices/{device_id}/messages/deviceBound"
    api = "api-version=2021-04-12"
    conn = https(hub)

    def req(method, target):
        conn.request(method, target, headers={"Authorization": token})
        r = conn.getresponse()
        return r, r.read()

    deadline = time.monotonic() + 10
    while True:  # the device reaches the engine's registry replica asynchronously
        r, _ = req("GET", f"{base}?{api}")
        if r.status != 401 or time.monotonic() > deadline:
            break
        conn = https(hub)
        time.sleep(0.2)
    assert r.status == 204, "nothing waits yet"
    for mid, body in (("h1", b"one"), ("h2", b"two"), ("h3", b"three")):
        assert send_c2d(hub, device_id, body, {"iothub-messageid": mid, "iothub-ack": "full",
                                               "iothub-app-colour": "red"}).status_code == 204

    def take():
        r, body = req("GET", f"{base}?{api}")
        assert r.status == 200, (r.status, body)
        etag = r.getheader("ETag")
        assert etag.startswith('"') and etag.endswith('"'), etag
        return r, body, etag.strip('"')

    r, body, lock = take()
    assert body == b"one" and r.getheader("iothub-messageid") == "h1"
    assert r.getheader("iothub-app-colour") == "red" and r.getheader("iothub-ack") == "full"
    assert r.getheader("iothub-to") == f"/devices/{device_id}/messages/deviceBound"
    assert req("DELETE", f"{base}/{lock}?{api}")[0].status == 204
    r, body, lock = take()
    assert r.getheader("iothub-messageid") == "h2"
    assert req("DELETE", f"{base}/{lock}?{api}&reject")[0].status == 204
    r, body, lock = take()
    assert r.getheader("iothub-messageid") == "h3"
    assert req("POST", f"{base}/{lock}/abandon?{api}")[0].status == 204
    r, body, again = take()
    assert r.getheader("iothub-messageid") == "h3" and body == b"three", "abandoned: given back"
    assert req("DELETE", f"{base}/{again}?{api}")[0].status == 204
    assert req("GET", f"{base}?{api}")[0].status == 204
    r, body = req("DELETE", f"{base}/{again}?{api}")
    assert r.status == 412 and r.getheader("iothub-errorcode") == "DeviceMessageLockLost", body
    conn.close()
    assert hub.show_device(device_id)["cloudToDeviceMessageCount"] == 0

    def statuses():
        records, _ = feedback(hub)
        got = {r["originalMessageId"]: r["statusCode"] for r in records if r["deviceId"] == device_id}
        return got if len(got) == 3 else None

    assert wait_until(statuses, 10, "feedback for the three") == {"h1": "Success", "h2": "Rejected", "h3": "Success"}


def test_the_node_device_sdk_over_http(shared_hub):
    """The Node device SDK's Http transport through port 443: sendEvent, sendEventBatch, and
    C2D by polling with complete, reject and abandon (each in the feedback)."""
    from test_c2d import feedback
    from test_node import node_steps

    hub = shared_hub
    device_id = unique_id("nodehttp")
    node_steps(hub, "device_http.js", ROOST_DEVICE_ID=device_id,
               ROOST_HTTPS_PORT=str(hub.ports["https"]), ROOST_AMQP_PORT=str(hub.ports["amqp"]),
               NODE_EXTRA_CA_CERTS=str(hub.ca_path))
    records = [r for r in hub.records() if r["systemProperties"].get("iothub-connection-device-id") == device_id
               and r["systemProperties"]["iothub-message-source"] == "Telemetry"]
    (single,) = [r for r in records if r["systemProperties"].get("message-id") == "http-node-1"]
    assert single["properties"]["transport"] == "Http"
    # The SDK's batch carries each message's body and application properties (not its id).
    assert {"batch http-node-b1", "batch http-node-b2"} <= {r["body"] for r in records}

    def statuses():
        records, _ = feedback(hub)
        got = {r["originalMessageId"]: r["statusCode"] for r in records if r["deviceId"] == device_id}
        return got if len(got) == 3 else None

    assert wait_until(statuses, 15, "feedback for the three") == {
        "http-c2d-complete": "Success", "http-c2d-reject": "Rejected", "http-c2d-abandon": "Success"}


def test_the_service_sdks_on_their_default_port(hub_factory, monkeypatch):
    """A hub whose `https` listener is on 443 serves the service API there, forwarded to
    control over the link: the Python `IoTHubRegistryManager` and the Node `azure-iothub`
    clients get the service connection string (`HostName=localhost`) and the hub's CA as a
    trusted root (REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS) and nothing else — no base URL, no
    port — for registry writes and reads, typed errors, twins, a query, jobs and a direct method
    that waits for its device."""
    from azure.iot.hub import IoTHubRegistryManager
    from azure.iot.hub.models import QuerySpecification, Twin
    from msrest.exceptions import HttpOperationError

    from test_methods import status_and_code
    from test_node import node_steps

    hub = hub_factory(start=False)
    hub.ports["https"] = 443
    hub.start()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(hub.ca_path))
    rm = IoTHubRegistryManager.from_connection_string(hub.service_connection_string)
    assert rm.protocol.config.base_url == "https://localhost"

    device_id = unique_id("svc443")
    created = rm.create_device_with_sas(device_id, None, None, "enabled")
    assert created.device_id == device_id and rm.get_device(device_id).status == "enabled"
    try:
        rm.get_device(device_id + "-nope")
        raise AssertionError("found a device that does not exist")
    except HttpOperationError as e:
        assert status_and_code(e) == (404, "DeviceNotFound")
    rm.update_twin(device_id, Twin(tags={"floor": 3}), "*")
    assert rm.get_twin(device_id).tags == {"floor": 3}
    rows = rm.query_iot_hub(QuerySpecification(query=f"SELECT * FROM devices WHERE tags.floor = 3 AND deviceId = '{device_id}'"))
    assert [t.device_id for t in rows.items] == [device_id]

    # A direct method: the call waits at control for the device, over the link, then answers.
    key = created.authentication.symmetric_key.primary_key
    client = hub.connected_client(f"HostName={hub.hostname};DeviceId={device_id};SharedAccessKey={key}")

    def handler(req):
        client.send_method_response(MethodResponse.create_from_method_request(req, 200, {"port": 443}))

    client.on_method_request_received = handler
    wait_subscribed(hub, rm, device_id)
    answer = invoke(rm, device_id, "where", None)
    assert answer.status == 200 and answer.payload == {"port": 443}
    rm.delete_device(device_id)
    hub.wait_metric("roost_https_requests_total", lambda v: v >= 6, "service requests on 443",
                    route="service", status="200")

    # The Node service SDK: Registry, Client.invokeDeviceMethod and JobClient at their defaults.
    before = hub.metric_sum("roost_https_requests_total", route="service")
    steps = node_steps(hub, "service_and_device.js", default_service_port=True, ROOST_DEVICE_ID=unique_id("node443"))
    assert len(steps) == 14, [s["step"] for s in steps]
    hub.wait_metric("roost_https_requests_total", lambda v: v >= before + 20, "the Node SDK's requests on 443",
                    route="service")
