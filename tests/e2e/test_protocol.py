"""MQTT protocol violations and keep-alive, driven with raw paho and a raw TLS socket (no SDK)
and a SAS token built here (wire spec §1.2, §2.3)."""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from conftest import (
    device_sas_token,
    metric_sum_of,
    mqtt_connect_packet,
    mqtt_username,
    read_exactly,
    record_body,
    telemetry_of,
    telemetry_topic,
    wait_eof,
    wait_until,
)

DISCONNECTS = "roost_disconnects_total"


def disconnects(metrics: dict, **labels: str) -> float:
    return metric_sum_of(metrics, DISCONNECTS, **labels)


def publish_ok(dev, device_id: str, body: bytes) -> None:
    """A valid QoS 1 telemetry publish that is acknowledged (the connection works)."""
    info = dev.publish(telemetry_topic(device_id, {"k": "v"}), body, qos=1)
    wait_until(info.is_published, 10, "PUBACK of a valid publish")


def bodies(hub, device_id: str) -> list[bytes]:
    return [record_body(r) for r in telemetry_of(hub.records(), device_id)]


def test_qos2_publish_disconnects(shared_hub):
    hub = shared_hub
    dev, device_id, _ = hub.new_raw_device("qos2")
    publish_ok(dev, device_id, b"before qos2")
    before = hub.metrics()
    dev.publish(telemetry_topic(device_id), b"qos2 payload", qos=2)
    dev.wait_disconnected()
    hub.wait_metric(DISCONNECTS, lambda v: v >= disconnects(before, reason="qos2_publish") + 1, "+1",
                    reason="qos2_publish")
    assert bodies(hub, device_id) == [b"before qos2"], "a QoS 2 publish must not be stored"


def test_publish_outside_iothub_topics_disconnects(shared_hub):
    hub = shared_hub
    dev, device_id, _ = hub.new_raw_device("foobar")
    publish_ok(dev, device_id, b"before foo/bar")
    before = hub.metrics()
    dev.publish("foo/bar", b"not an iothub topic", qos=1)
    dev.wait_disconnected()
    hub.wait_metric(DISCONNECTS, lambda v: v >= disconnects(before, reason="not_iothub_topic") + 1, "+1",
                    reason="not_iothub_topic")
    assert bodies(hub, device_id) == [b"before foo/bar"]


@pytest.mark.parametrize("size, reason", [
    (270 * 1024, "payload_too_large"),  # a frame the codec takes, a body over IoT Hub's 256 KiB
    # Over the one frame limit (301 KiB, roost_mqtt::Limits::default, which the engine's MQTT
    # sessions use): refused from the fixed header, before it is buffered.
    (302 * 1024, "frame_too_large"),
])
def test_oversized_publish_disconnects(shared_hub, size, reason):
    """A PUBLISH over the size limit closes the connection, is counted, and is not stored.
    Driven over a raw TLS socket: paho's network thread can die on an abrupt close without
    reporting it, which made a paho-based version of this test flaky."""
    hub = shared_hub
    dev, device_id, key = hub.new_raw_device("big")
    publish_ok(dev, device_id, b"before big")
    dev.close()
    before = hub.metrics()
    sock = hub.tls_socket(timeout=10.0)
    try:
        sock.sendall(mqtt_connect_packet(device_id, mqtt_username(hub.hostname, device_id),
                                         device_sas_token(hub.hostname, device_id, key), keepalive=60))
        assert read_exactly(sock, 4) == bytes([0x20, 0x02, 0x00, 0x00]), "CONNACK accepted"
        topic = telemetry_topic(device_id).encode()
        body = len(topic).to_bytes(2, "big") + topic + (1).to_bytes(2, "big") + b"x" * size
        length, rl = len(body), b""
        while True:
            digit, length = length % 128, length // 128
            rl += bytes([digit | (0x80 if length else 0)])
            if not length:
                break
        try:
            sock.sendall(bytes([0x32]) + rl + body)
        except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
            pass  # closed while we were still sending: what the test wants
        try:
            extra = wait_eof(sock)
        except socket.timeout:
            raise AssertionError("an oversized PUBLISH did not close the connection within 10 s") from None
    finally:
        sock.close()
    assert extra == b"", f"no PUBACK may answer an oversized publish, got {extra!r}"
    hub.wait_metric(DISCONNECTS, lambda v: v >= disconnects(before, reason=reason) + 1, "+1", reason=reason)
    assert bodies(hub, device_id) == [b"before big"], "an oversized publish must not be stored"


def test_keepalive_timeout_closes_silent_connection(shared_hub):
    hub = shared_hub
    dev, device_id, key = hub.new_raw_device("keepalive")
    dev.close()  # the device is known to the engine; the raw socket below is its only connection
    before = hub.metrics()

    sock = hub.tls_socket(timeout=10.0)  # a recv that waits 10 s without EOF fails the test
    try:
        packet = mqtt_connect_packet(device_id, mqtt_username(hub.hostname, device_id),
                                     device_sas_token(hub.hostname, device_id, key), keepalive=2)
        t0 = time.monotonic()
        sock.sendall(packet)
        assert read_exactly(sock, 4) == bytes([0x20, 0x02, 0x00, 0x00]), "CONNACK accepted"
        try:
            extra = wait_eof(sock)
        except socket.timeout:
            raise AssertionError("a client silent for 10 s with keep-alive 2 s was not disconnected") from None
        elapsed = time.monotonic() - t0
    finally:
        sock.close()
    assert extra == b"", f"unexpected bytes from the hub: {extra!r}"
    assert elapsed >= 2.0, f"closed after {elapsed:.2f}s, before the keep-alive period of 2 s"
    hub.wait_metric(DISCONNECTS, lambda v: v >= disconnects(before, reason="keepalive_timeout") + 1, "+1",
                    reason="keepalive_timeout")
