#!/usr/bin/env python3
"""Writes the seed corpus for the mqtt_frame fuzz target into corpus/mqtt_frame/."""

import os
import struct


def remaining_length(n):
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame(byte0, body):
    return bytes([byte0]) + remaining_length(len(body)) + body


def s(text):
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def connect():
    username = "hub.example.net/d1/?api-version=2021-04-12&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0"
    password = b"SharedAccessSignature sr=hub.example.net%2Fdevices%2Fd1&sig=c2lnbmF0dXJl&se=1767225600"
    flags = 0x80 | 0x40  # user name, password; CleanSession 0 as the SDKs send it
    body = s("MQTT") + bytes([4, flags]) + struct.pack(">H", 60) + s("d1") + s(username)
    body += struct.pack(">H", len(password)) + password
    return frame(0x10, body)


def publish(qos, pkid, topic, payload):
    body = s(topic) + (struct.pack(">H", pkid) if qos else b"") + payload
    return frame(0x30 | qos << 1, body)


def subscribe():
    filters = [("devices/d1/messages/devicebound/#", 1), ("$iothub/twin/res/#", 0), ("$iothub/methods/POST/#", 0)]
    body = struct.pack(">H", 1) + b"".join(s(f) + bytes([q]) for f, q in filters)
    return frame(0x82, body)


SEEDS = {
    "connect_iothub": connect(),
    "publish_qos0": publish(0, 0, "$iothub/twin/GET/?$rid=1", b" "),
    "publish_qos1": publish(1, 7, "devices/d1/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8", b'{"t":21.5}'),
    "subscribe_3_filters": subscribe(),
    "pingreq": frame(0xC0, b""),
    "disconnect": frame(0xE0, b""),
    "stream_publish_pingreq": publish(1, 9, "devices/d1/messages/events/", b"x") + frame(0xC0, b""),
    "bad_connect_mqtt5": frame(0x10, s("MQTT") + bytes([5, 0x02]) + struct.pack(">H", 60) + b"\x00" + s("d1")),
    "publish_qos2": publish(2, 1, "devices/d1/messages/events/", b"x"),  # parses; the session refuses it
    "bad_publish_qos3": publish(3, 1, "devices/d1/messages/events/", b"x"),
    "bad_subscribe_flags": frame(0x80, struct.pack(">H", 1) + s("a/#") + b"\x01"),
    "bad_remaining_length": b"\x30\xff\xff\xff\xff\x01",
    "bad_topic_overrun": b"\x30\x04\x00\x09abc",
}

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "mqtt_frame")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
