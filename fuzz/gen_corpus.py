#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into corpus/<target>/: well-formed inputs as the
official SDKs send them (testdata/iothub_vectors.json) and the shapes of known broker CVEs
(specs/fuzz-seeds.md)."""

import json
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

# The shapes of known broker bugs (specs/fuzz-seeds.md), as MQTT streams.
CVE_SEEDS = {
    "cve_2019_11779_deep_filter": frame(0x82, struct.pack(">H", 1) + s("/" * 65000) + b"\x01"),
    "cve_2021_34432_empty_topic": publish(0, 0, "", b"x"),
    "cve_2023_0809_huge_first_packet": b"\x30\xff\xff\xff\x7f" + b"x" * 64,
    "cve_2023_28366_qos2_dup_ids": publish(2, 5, "devices/d1/messages/events/", b"x") * 4,
    "cve_2021_28166_client_connack": connect() + frame(0x20, b"\x00\x00"),
    "rumqttd_812_connack_before_auth": frame(0x20, b"\x00\x00"),
    "sol_15_puback_first": b"\x40\x02\x00\x01",
    "nanomq_vbi_5_bytes": b"\x10\xff\xff\xff\xff\x7f",
    "rl_claims_more_then_eof": b"\x30\x80\x10" + b"x" * 10,
    "reserved_type_0": frame(0x00, b""),
    "reserved_type_15": frame(0xF0, b""),
    "connect_twice": connect() + connect(),
    "subscribe_no_topics": frame(0x82, struct.pack(">H", 1)),
    "subscribe_pkid_0": frame(0x82, struct.pack(">H", 0) + s("a") + b"\x00"),
    "publish_wildcards": publish(0, 0, "a/+/#", b"x"),
    "filter_hash_not_last": frame(0x82, struct.pack(">H", 1) + s("a/#/b") + b"\x00"),
    "nul_in_string": publish(0, 0, "devices/d1\x00/messages/events/", b"x"),
    "overlong_utf8": frame(0x30, struct.pack(">H", 2) + b"\xc0\xaf"),
    "surrogate_utf8": frame(0x30, struct.pack(">H", 3) + b"\xed\xa0\x80"),
    "will_qos_without_will": frame(0x10, s("MQTT") + bytes([4, 0x10]) + struct.pack(">H", 60) + s("d1")),
    "password_without_username": frame(0x10, s("MQTT") + bytes([4, 0x40]) + struct.pack(">H", 60) + s("d1") + s("pw")),
    "qos1_window_flood": b"".join(publish(1, i, "devices/d1/messages/events/", b"x") for i in range(1, 200)),
}


def vectors():
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "..", "shared", "testdata", "iothub_vectors.json")
    if not os.path.exists(path):
        return {"device_tokens": [], "service_tokens": [], "d2c_topics": []}
    with open(path) as f:
        return json.load(f)


def text_corpora():
    v = vectors()
    tokens = [t["token"] for t in v.get("device_tokens", []) + v.get("service_tokens", [])]
    topics = [t["topic"] for t in v.get("d2c_topics", [])]
    bags = [t.split("/messages/events/", 1)[1] for t in topics if "/messages/events/" in t]
    return {
        "sas_token": tokens + [
            "SharedAccessSignature sr=hub%2Fdevices%2Fd1&sig=eA%3D%3D&se=1&skn=",
            "SharedAccessSignature sr=hub&sig=%%%&se=99999999999999999999999",
            "SharedAccessSignature  sr=a&&&sig=&se=",
            "sharedaccesssignature SR=a&SIG=b&SE=1&SKN=x&sr=b",
        ],
        "connection_string": [
            "HostName=hub.example.net;DeviceId=d1;SharedAccessKey=AAAA",
            "HostName=hub.example.net;DeviceId=d1;ModuleId=m;SharedAccessKey=AAAA;GatewayHostName=gw",
            "HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey=AAAA",
            "HostName=h;DeviceId=d;x509=true;SharedAccessKey=A",
            ";;==;HostName;=;",
        ],
        "username": [
            "d1\nhub.example.net/d1/?api-version=2021-04-12&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0",
            "d1/m1\nhub.example.net/d1/m1/?api-version=2021-04-12&model-id=dtmi%3Acom%3Aexample%3Ax%3B1",
            "d1\nhub/d1",
            "+\nhub/+/#/?api-version=1",
            "\n//////?",
        ],
        "topic": topics + [
            "devices/d1/messages/devicebound/#",
            "devices/d1/modules/m1/inputs/#",
            "$iothub/twin/res/#",
            "$iothub/methods/POST/#",
            "$iothub/twin/PATCH/properties/desired/#",
            "$iothub/twin/GET/?$rid=1",
            "$iothub/methods/res/200/?$rid=1",
            "devices/+/messages/devicebound/#",
            "/" * 4096,
            "a/#/b",
            "",
        ],
        "property_bag": bags + ["%24.mid=%E0%A4%A&a", "a=1&a=2&=&&b", "%24.to=%2Fdevices%2Fd", "x=" + "%41" * 500],
        "query_string": ["from=0&max=100", "from=earliest", "api-version=2021-04-12&top=10", "max=%FF%FE", "a&&=&b=%"],
        "route_condition": [
            "$body.temperature > 30 AND $twin.tags.site = 'north'\n{\"temperature\": 35}",
            "level = 'critical' OR $connectionDeviceId = 'd1'",
            "$body.a[1] = 2 AND IS_DEFINED($body.b.c)\n{\"a\": [1, 2], \"b\": {\"c\": null}}",
            "$dt-dataschema = 'x' OR STARTS_WITH($messageId, 'm')",
            "AS_NUMBER(n) * 2 >= 14 AND level IN ['warning', 'critical']\nnot json",
            "$body > 1", "$twin.properties.reported.x = 1", "((((((((((a))))))))))", "$body.",
        ],
        "routes_lua": [
            open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "routes.lua")).read(),
            'return { endpoints = { alerts = { kind = "webhook", url = "http://127.0.0.1:9/a" } },\n'
            '  plugins = { { use = "p", config = { n = 2 } } },\n'
            '  routes = { { name = "hot", condition = "$body.temperature > 30", endpoints = { "alerts" } },\n'
            '    { name = "lua", condition = function(msg, device) return msg.props.level == "critical" end, endpoints = { "events" } } },\n'
            '  fallback = false,\n'
            '  enrichments = { { key = "site", value = "$twin.tags.site", endpoints = { "alerts" } } } }',
            "while true do end", "return { routes = { { name = 'a' } } }", "local t = {} t.t = t return t",
            "return { colour = 1 }", "return string.rep('x', 1 << 30)",
        ],
        "hub_json": ['{"hostname":"h","ports":{"mqtt":8883},"ops_url":"http://127.0.0.1:9464"}', "[]", "{", '{"ports":{"mqtt":-1}}'],
    }


# ---- AMQP 1.0 (amqp_frame): the frames of the transcripts in specs/azure-amqp-eventhubs.md §7,
# encoded here independently of roost-amqp (liberal forms too: list0, symbolic descriptors).
class Sym(str):
    pass


class Described:
    def __init__(self, descriptor, value):
        self.descriptor, self.value = descriptor, value


class Uuid(bytes):
    pass


class Ts(int):
    pass


class Ulong(int):
    pass


def amqp(v):
    if v is None:
        return b"\x40"
    if v is True:
        return b"\x41"
    if v is False:
        return b"\x42"
    if isinstance(v, Described):
        return b"\x00" + amqp(v.descriptor) + amqp(v.value)
    if isinstance(v, Ts):
        return b"\x83" + struct.pack(">q", v)
    if isinstance(v, Ulong):
        return b"\x53" + bytes([v]) if v < 256 else b"\x80" + struct.pack(">Q", v)
    if isinstance(v, int):
        return b"\x70" + struct.pack(">I", v) if v >= 0 else b"\x71" + struct.pack(">i", v)
    if isinstance(v, Uuid):
        return b"\x98" + bytes(v)
    if isinstance(v, bytes):
        return (b"\xa0" + bytes([len(v)]) if len(v) < 256 else b"\xb0" + struct.pack(">I", len(v))) + v
    if isinstance(v, Sym):
        raw = v.encode()
        return b"\xa3" + bytes([len(raw)]) + raw
    if isinstance(v, str):
        raw = v.encode()
        return (b"\xa1" + bytes([len(raw)]) if len(raw) < 256 else b"\xb1" + struct.pack(">I", len(raw))) + raw
    if isinstance(v, list):
        if not v:
            return b"\x45"
        body = b"".join(amqp(i) for i in v)
        return b"\xd0" + struct.pack(">II", len(body) + 4, len(v)) + body
    if isinstance(v, dict):
        body = b"".join(amqp(k) + amqp(x) for k, x in v.items())
        return b"\xd1" + struct.pack(">II", len(body) + 4, 2 * len(v)) + body
    raise TypeError(v)


def perf(code, fields):
    return amqp(Described(Ulong(code), fields))


def amqp_frame(body, kind=0, channel=0):
    return struct.pack(">IBBH", 8 + len(body), 2, kind, channel) + body


def section(code, value):
    return amqp(Described(Ulong(code), value))


def amqp_seeds():
    host = "hub.example.net"
    token = "SharedAccessSignature sr=sb%3A%2F%2Fhub.example.net%2Fhub&sig=c2ln&se=1767225600&skn=iothubowner"
    cbs = section(0x73, [Uuid(bytes(range(16)))]) + section(0x74, {
        "name": "sb://hub.example.net/hub", "operation": "put-token",
        "type": "servicebus.windows.net:sastoken", "expiration": Ts(1767225600000)}) + section(0x77, token)
    transfer = lambda handle, did, payload, settled=False: amqp_frame(
        perf(0x14, [handle, did, b"\x00\x00\x00\x01", 0, settled, False]) + payload)
    selector = Described(Sym("apache.org:selector-filter:string"), "amqp.annotation.x-opt-offset > '-1'")
    event = section(0x72, {Sym("x-opt-sequence-number"): Ulong(0), Sym("x-opt-offset"): "0",
                           Sym("x-opt-enqueued-time"): Ts(1767225600000), Sym("iothub-connection-device-id"): "dev1",
                           Sym("iothub-message-source"): "Telemetry"}) \
        + section(0x73, ["m-1", None, None, None, None, None, Sym("application/json"), Sym("utf-8")]) \
        + section(0x74, {"level": "critical"}) + section(0x75, b'{"temperature":31}')
    py_eh = (b"AMQP\x03\x01\x00\x00"
             + amqp_frame(perf(0x41, [Sym("ANONYMOUS"), b"", host]), kind=1)
             + b"AMQP\x00\x01\x00\x00"
             + amqp_frame(perf(0x10, ["c-uuid", host, 1048576, 65535]))
             + amqp_frame(perf(0x11, [None, 0, 65536, 65536, 4294967295]))
             + amqp_frame(perf(0x12, ["r-uuid", 2, True, 0, 0, Described(Ulong(0x28), ["$cbs"]), Described(Ulong(0x29), ["$cbs"])]))
             + amqp_frame(perf(0x12, ["s-uuid", 1, False, 0, 0, Described(Ulong(0x28), ["$cbs"]), Described(Ulong(0x29), ["$cbs"]), None, None, 0]))
             + amqp_frame(perf(0x13, [0, 65536, 0, 65536, 2, 0, 10000]))
             + transfer(1, 0, cbs)
             + amqp_frame(perf(0x12, ["rcv", 3, True, 0, 0,
                                      Described(Ulong(0x28), ["amqps://hub.example.net/hub/ConsumerGroups/$Default/Partitions/0",
                                                              None, None, None, None, None, None,
                                                              {Sym("apache.org:selector-filter:string"): selector}]),
                                      Described(Ulong(0x29), ["receiver-link-1"]), None, None, None, Ulong(1048576), None,
                                      [Sym("com.microsoft:georeplication")], {Sym("com.microsoft:timeout"): 0}]))
             + amqp_frame(b"")
             + amqp_frame(perf(0x16, [3, True]))
             + amqp_frame(perf(0x17, []))
             + amqp_frame(perf(0x18, [])))
    py_hub = (b"AMQP\x03\x01\x00\x00"
              + amqp_frame(perf(0x41, [Sym("MSSBCBS")]), kind=1)
              + b"AMQP\x00\x01\x00\x00"
              + amqp_frame(perf(0x10, ["c", host, 65536, 65535]))
              + amqp_frame(perf(0x12, ["sender-link-1", 0, False, 0, 1, Described(Ulong(0x28), ["client"]),
                                       Described(Ulong(0x29), ["amqps://hub.example.net/messages/devicebound"]),
                                       None, None, 0, Ulong(1048576)]))
              + transfer(0, 5, section(0x73, ["uuid-string", None, "/devices/dev1/messages/devicebound"])
                         + section(0x74, {"iothub-ack": "full"}) + section(0x75, b"hi")))
    n_dev = (b"AMQP\x00\x01\x00\x00"
             + amqp_frame(amqp(Described(Sym("amqp:open:list"), ["rhea-uuid", host])))
             + amqp_frame(perf(0x11, [None, 0, 2048, 4294967295]))
             + amqp_frame(perf(0x12, ["rheaSender_1", 2, False, None, None, Described(Ulong(0x28), []),
                                      Described(Ulong(0x29), ["/devices/dev1/messages/events"])]))
             + transfer(2, 7, section(0x73, [None, None, "/devices/dev1/messages/events"]) + section(0x75, b"x"))
             + amqp_frame(perf(0x15, [True, 0, 0, True, Described(Ulong(0x24), [])])))
    event_out = transfer(0, 0, event, settled=True)
    multi = amqp_frame(perf(0x14, [0, 1, b"t", 0, False, True]) + event[:20]) \
        + amqp_frame(perf(0x14, [0, None, None, None, False, False]) + event[20:])
    return {"py_eventhub": py_eh, "py_hub_c2d": py_hub, "node_device": n_dev,
            "event_out": event_out, "multi_frame": multi,
            "huge_count": b"AMQP\x00\x01\x00\x00" + amqp_frame(b"\x00\x53\x10\xd0\x00\x00\x00\x05\xff\xff\xff\xff\x40"),
            "deep": amqp_frame(b"\x00\x53\x01" * 40 + b"\x40"),
            "oversize": struct.pack(">I", 0xfffffff0) + b"\x02\x00\x00\x00"}


# ---- WebSockets (ws_session, http_head): frames masked as a client sends them, and the
# upgrade requests the SDKs send (RFC 6455, specs/azure-amqp-eventhubs.md §6).
def ws_frame(opcode, payload, fin=True, mask=b"\x01\x02\x03\x04"):
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def ws_seeds():
    c = connect()
    return {
        "mqtt_connect": ws_frame(2, c),
        "fragmented": ws_frame(2, c[:5], fin=False) + ws_frame(0, c[5:]),
        "ping_close": ws_frame(9, b"p") + ws_frame(8, struct.pack(">H", 1000)),
        "amqp_header": ws_frame(2, b"AMQP\x00\x01\x00\x00"),
        "text": ws_frame(1, b"hello"),
        "unmasked": b"\x82\x02hi",
        "huge": b"\x82\xff" + struct.pack(">Q", 1 << 40),
    }


def head_seeds():
    up = ("GET /$iothub/websocket HTTP/1.1\r\nHost: hub.example.net\r\nUpgrade: websocket\r\n"
          "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
          "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {}\r\n\r\n")
    return {
        "upgrade_mqtt": up.format("mqtt").encode(),
        "upgrade_amqp": up.format("AMQPWSB10").encode().replace(b"$iothub", b"$servicebus"),
        "device_post": (b"POST /devices/dev1/messages/events?api-version=2021-04-12 HTTP/1.1\r\n"
                        b"Host: hub.example.net\r\nAuthorization: SharedAccessSignature sr=x&sig=y&se=1\r\n"
                        b"iothub-app-level: critical\r\nContent-Length: 2\r\n\r\n{}"),
        "partial": b"GET / HTTP/1.1\r\nHost: h",
        "chunked": b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    }


def write(target, name, data):
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", target)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)


if __name__ == "__main__":
    streams = dict(SEEDS, **CVE_SEEDS)
    for name, data in streams.items():
        write("mqtt_frame", name, data)
        # mqtt_session: one byte of choices (accept or refuse, clock steps, sends), then the stream.
        for choice in (0, 1, 6):
            write("mqtt_session", f"{name}_{choice}", bytes([choice]) + data)
    for target, seeds in text_corpora().items():
        for i, text in enumerate(seeds):
            write(target, f"seed_{i:02}", text.encode())
    # twin_patch: one byte of operations (service patch, replace, device patch), then JSON.
    twin = [
        '{"tags":{"site":"oslo"},"properties":{"desired":{"rate":5,"net":{"wifi":true}}}}',
        '{"etag":"*","properties":{"desired":{"rate":null},"reported":{"x":1}}}',
        '{"fw":"1.0","net":{"ip":"10.0.0.2","rssi":-60},"gone":null}',
        '{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}',
        '{"a.b":1,"$x":2}', '{"n":4503599627370496,"f":1e308,"l":[1,2]}', '"text"', "null",
        '{"tags":{"a":{}},"properties":{"desired":{"a":{}}}}',
    ]
    for i, text in enumerate(twin):
        for op in (0, 1, 2, 5):
            write("twin_patch", f"seed_{i:02}_{op}", bytes([op]) + text.encode())
    for name, data in amqp_seeds().items():
        write("amqp_frame", name, data)
        # amqp_connection: one byte of choices (chunk size, SASL verdict, time, links), then
        # the stream.
        for choice in (0, 0x07, 0x63, 0xa0):
            write("amqp_connection", f"{name}_{choice:02x}", bytes([choice]) + data)
    for name, data in ws_seeds().items():
        for choice in (0x00, 0x47, 0xff):
            write("ws_session", f"{name}_{choice:02x}", bytes([choice]) + data)
    for name, data in head_seeds().items():
        write("http_head", name, data)
    # link_frame: a length prefix and bodies that are not archives.
    for i, data in enumerate([b"\x00\x00\x00\x00", b"\xff\xff\xff\x7f", b"\x01" * 64, b""]):
        write("link_frame", f"seed_{i:02}", data)
