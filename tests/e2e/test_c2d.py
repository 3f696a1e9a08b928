"""Cloud-to-device messages: sent with roost's REST call (`POST /devices/{id}/messages/deviceBound`,
properties in headers as the HTTPS device API carries them), received by the Python SDK's
`on_message_received` with their properties, completed by the device's PUBACK, kept for an
offline device, redelivered with DUP when a connection ended without acknowledging, expired
with feedback records (`GET /messages/serviceBound/feedback`), and at most 50 waiting per
device (403004)."""

from __future__ import annotations

import json
import queue
import time
from datetime import datetime, timedelta, timezone

import requests

from conftest import parse_connection_string, unique_id, wait_until


def send_c2d(hub, device_id: str, body: bytes | str, headers: dict | None = None) -> requests.Response:
    h = hub.service_headers()
    h.pop("Content-Type", None)
    h.update(headers or {})
    return requests.post(f"{hub.service_url}/devices/{device_id}/messages/deviceBound?api-version=2021-04-12",
                         data=body, headers=h, verify=hub.ca_path, timeout=10)


def feedback(hub) -> tuple[list, str | None]:
    r = requests.get(f"{hub.service_url}/messages/serviceBound/feedback?api-version=2021-04-12",
                     headers=hub.service_headers(), verify=hub.ca_path, timeout=10)
    if r.status_code == 204:
        return [], None
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/vnd.microsoft.iothub.feedback.json"
    return r.json(), r.headers["etag"].strip('"')


def complete_feedback(hub, lock: str) -> None:
    r = requests.delete(f"{hub.service_url}/messages/serviceBound/feedback/{lock}?api-version=2021-04-12",
                        headers=hub.service_headers(), verify=hub.ca_path, timeout=10)
    assert r.status_code == 204, r.text


def c2d_count(hub, device_id: str) -> int:
    return hub.show_device(device_id)["cloudToDeviceMessageCount"]


def test_the_sdk_receives_messages_with_their_properties_and_completes_them(shared_hub):
    hub = shared_hub
    device_id = unique_id("c2d")
    conn_str = hub.create_device(device_id)
    # Queued for an offline device...
    r = send_c2d(hub, device_id, b'{"n":0}', {
        "iothub-messageid": "m0", "iothub-correlationid": "c0", "iothub-ack": "positive",
        "Content-Type": "application/json", "Content-Encoding": "utf-8",
        "iothub-app-colour": "blue", "iothub-app-path": "a/b=c&d e"})
    assert r.status_code == 204, r.text
    assert c2d_count(hub, device_id) == 1

    client = hub.connected_client(conn_str)
    got: queue.Queue = queue.Queue()
    client.on_message_received = got.put  # subscribes; the queued message arrives then
    m = got.get(timeout=10)
    assert m.data == b'{"n":0}'
    assert m.message_id == "m0"
    assert m.correlation_id == "c0"
    assert m.content_type == "application/json"
    assert m.content_encoding == "utf-8"
    assert m.custom_properties["colour"] == "blue"
    assert m.custom_properties["path"] == "a/b=c&d e", "URL-encoded in the topic, decoded by the SDK"
    assert m.ack == "positive"
    assert m.expiry_time_utc, "an expiry is always set (1 hour by default)"

    # ...and sent at once to a connected one, in order.
    for i in range(1, 4):
        assert send_c2d(hub, device_id, f"msg {i}").status_code == 204
    assert [got.get(timeout=10).data for _ in range(3)] == [b"msg 1", b"msg 2", b"msg 3"]
    wait_until(lambda: c2d_count(hub, device_id) == 0, 10, "every message completed")

    # The positive ack asked for feedback on completion.
    def success_feedback():
        records, lock = feedback(hub)
        mine = [r for r in records if r["originalMessageId"] == "m0"]
        return (mine, lock) if mine else None

    found = wait_until(success_feedback, 10, "a Success feedback record")
    mine, lock = found
    assert mine[0]["statusCode"] == "Success" and mine[0]["deviceId"] == device_id
    complete_feedback(hub, lock)
    records, _ = feedback(hub)
    assert all(r["originalMessageId"] != "m0" for r in records)


def test_an_unacknowledged_message_is_redelivered_with_dup_after_a_reconnect(shared_hub):
    hub = shared_hub
    device_id = unique_id("c2d")
    key = parse_connection_string(hub.create_device(device_id))["SharedAccessKey"]
    topic_filter = f"devices/{device_id}/messages/devicebound/#"

    first = hub.raw_connected_device(device_id, key, clean_session=False)
    first.client._send_puback = lambda mid: 0  # paho 1.x acks before on_message: hold it
    got = first.subscribe_collect(topic_filter)
    first_msgs: queue.Queue = queue.Queue()
    first.client.message_callback_add(topic_filter, lambda c, u, m: first_msgs.put(m))
    assert send_c2d(hub, device_id, b"hold me", {"iothub-messageid": "h1"}).status_code == 204
    m = first_msgs.get(timeout=10)
    assert m.payload == b"hold me" and not m.dup
    assert "%24.mid=h1" in m.topic and "%24.to=%2Fdevices%2F" in m.topic, m.topic
    first.close()
    assert c2d_count(hub, device_id) == 1, "not acknowledged: still queued"

    # The session is resumed (no SUBSCRIBE): the message comes again, marked DUP.
    second = hub.raw_connected_device(device_id, key, clean_session=False)
    again: queue.Queue = queue.Queue()
    second.client.on_message = lambda c, u, m: again.put(m)
    m = again.get(timeout=10)
    assert m.payload == b"hold me" and m.dup
    wait_until(lambda: c2d_count(hub, device_id) == 0, 10, "completed by the second PUBACK")
    del got


def test_queue_limit_and_expiry_with_feedback(shared_hub):
    hub = shared_hub
    device_id = unique_id("c2d")
    hub.create_device(device_id)
    for i in range(50):
        assert send_c2d(hub, device_id, f"{i}").status_code == 204
    r = send_c2d(hub, device_id, "the 51st")
    assert r.status_code == 403, r.text
    assert json.loads(r.json()["Message"])["errorCode"] == 403004
    assert r.headers["iothub-errorcode"] == "DeviceMaximumQueueDepthExceeded"
    assert send_c2d(hub, unique_id("nobody"), "x").status_code == 404
    bad = send_c2d(hub, device_id, "x", {"iothub-ack": "sometimes"})
    assert bad.status_code == 400

    other = unique_id("c2d")
    key = parse_connection_string(hub.create_device(other))["SharedAccessKey"]
    soon = (datetime.now(timezone.utc) + timedelta(seconds=2)).isoformat().replace("+00:00", "Z")
    r = send_c2d(hub, other, "short-lived", {"iothub-messageid": "exp1", "iothub-ack": "full",
                                            "iothub-expiry": soon})
    assert r.status_code == 204, r.text
    time.sleep(3.5)
    wait_until(lambda: c2d_count(hub, other) == 0, 10, "the expired message is gone")
    records, _ = feedback(hub)
    expired = [r for r in records if r["originalMessageId"] == "exp1"]
    assert expired and expired[0]["statusCode"] == "Expired", records
    # A device connecting now gets nothing.
    dev = hub.raw_connected_device(other, key, clean_session=True)
    msgs = dev.subscribe_collect(f"devices/{other}/messages/devicebound/#")
    time.sleep(1.0)
    assert msgs.empty()


def test_the_cli_for_twins_methods_and_c2d(shared_hub):
    from test_methods import answer_with, wait_subscribed

    hub = shared_hub
    device_id = unique_id("cli")
    client = hub.connected_client(hub.create_device(device_id))
    got: queue.Queue = queue.Queue()
    client.on_message_received = got.put
    answer_with(client)
    wait_subscribed(hub, hub.registry_manager(), device_id)

    twin = json.loads(hub.cli("twin", "patch", device_id, '{"tags":{"site":"oslo"}}').stdout)
    assert twin["tags"] == {"site": "oslo"}
    stale = hub.cli("twin", "patch", device_id, '{"tags":{"a":1}}', "--etag", "nope", check=False)
    assert stale.returncode != 0 and "412" in stale.stderr, stale.stderr
    assert json.loads(hub.cli("twin", "get", device_id).stdout)["tags"] == {"site": "oslo"}

    answer = json.loads(hub.cli("method", "invoke", device_id, "reboot", '{"delay":1}').stdout)
    assert answer == {"status": 200, "payload": {"echo": {"delay": 1}, "method": "reboot"}}

    hub.cli("c2d", "send", device_id, "from the cli", "--prop", "k=v", "--message-id", "cli1",
            "--ack", "full", "--ttl", "600")
    m = got.get(timeout=10)
    assert (m.data, m.message_id, m.custom_properties.get("k")) == (b"from the cli", "cli1", "v")

    def cli_feedback():
        out = json.loads(hub.cli("c2d", "feedback").stdout)
        return [r for r in out if r["originalMessageId"] == "cli1"]

    assert wait_until(cli_feedback, 10, "feedback for cli1")[0]["statusCode"] == "Success"
    hub.cli("c2d", "feedback", "--complete")
    assert not cli_feedback()
