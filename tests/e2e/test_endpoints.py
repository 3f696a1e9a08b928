"""External endpoints (issue 9 §5) with the official Python device SDK: messages reach exactly
the endpoints their routes name — a webhook server in the test, a real nats-server with
JetStream, a mosquitto subscriber, NDJSON files — with their enrichments, each once; a dead
endpoint holds neither ingest nor the other endpoints, retries with backoff, shows its lag, and
catches up when it comes back; the checkpoint survives an engine restart."""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from azure.iot.device import Message
from azure.iot.hub.models import Twin

from conftest import call_with_timeout, free_port, unique_id, wait_until

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


class Webhook:
    """An HTTP server that keeps every POSTed JSON array; answers 503 while `down`."""

    def __init__(self) -> None:
        self.bodies: list[list[dict]] = []
        self.headers: list[dict] = []
        self.down = False
        self.refused = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if hook.down:
                    hook.refused += 1
                    self.send_response(503)
                else:
                    hook.bodies.append(json.loads(body))
                    hook.headers.append({k.lower(): v for k, v in self.headers.items()})
                    self.send_response(204)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def records(self) -> list[dict]:
        return [r for b in list(self.bodies) for r in b]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_port(port: int, what: str) -> None:
    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            return False
    wait_until(up, 15, what, interval=0.1)


@pytest.fixture
def webhook():
    w = Webhook()
    yield w
    w.close()


@pytest.fixture
def nats_url(tmp_path):
    port = free_port()
    log = (tmp_path / "nats.log").open("w")
    proc = subprocess.Popen([NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(port),
                             "-sd", str(tmp_path / "jetstream")], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, "nats-server")
        url = f"nats://127.0.0.1:{port}"
        asyncio.run(_add_stream(url))
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def _add_stream(url: str) -> None:
    import nats
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(name="ROOST", subjects=["roost.telemetry"])
    finally:
        await nc.close()


def stream_messages(url: str) -> list:
    """Every message the stream ROOST holds, in order: (data, headers)."""
    async def read():
        import nats
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            info = await js.stream_info("ROOST")
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                m = await js.get_msg("ROOST", seq)
                out.append((m.data, dict(m.headers or {})))
            return out
        finally:
            await nc.close()
    return asyncio.run(read())


@pytest.fixture
def mosquitto(tmp_path):
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    log = (tmp_path / "mosquitto.log").open("w")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, "mosquitto")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def subscriber(port: int, topic: str) -> tuple[paho.Client, queue.Queue]:
    got: queue.Queue = queue.Queue()
    subscribed = threading.Event()
    c = paho.Client(client_id=unique_id("sub"))
    c.on_message = lambda client, userdata, msg: got.put((msg.topic, msg.payload))
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect("127.0.0.1", port)
    c.subscribe(topic, qos=1)
    c.loop_start()
    assert subscribed.wait(10), "the mosquitto subscription was not acknowledged"
    return c, got


def send(client, body: dict) -> None:
    m = Message(json.dumps(body), content_encoding="utf-8", content_type="application/json")
    call_with_timeout(client.send_message, m, what="send")


def apply_routes(hub, tmp_path: Path, text: str) -> dict:
    path = tmp_path / "routes.lua"
    path.write_text(text)
    return json.loads(hub.cli("routes", "apply", str(path)).stdout)


def test_messages_reach_exactly_the_endpoints_their_routes_name(hub, tmp_path, webhook, nats_url, mosquitto):
    device_id = unique_id("ep")
    conn = hub.create_device(device_id)
    hub.registry_manager().update_twin(device_id, Twin(tags={"site": "north"}), "*")
    sub, got = subscriber(mosquitto, "fleet/+/telemetry")
    apply_routes(hub, tmp_path, f"""
return {{
  endpoints = {{
    hook = {{ kind = "webhook", url = "http://127.0.0.1:{webhook.port}/ingest", batch = 10,
             headers = {{ ["x-token"] = "t0ken" }} }},
    archive = {{ kind = "file", path = "archive" }},
    stream = {{ kind = "nats", url = "{nats_url}", subject = "roost.telemetry" }},
    broker = {{ kind = "mqtt", url = "mqtt://127.0.0.1:{mosquitto}", topic = "fleet/{{deviceId}}/telemetry" }},
  }},
  routes = {{
    {{ name = "alerts", condition = "$body.level = 'alert'", endpoints = {{ "hook", "stream" }} }},
    {{ name = "kept", condition = "$body.level IN ['alert', 'info']", endpoints = {{ "archive" }} }},
    {{ name = "info", condition = "$body.level = 'info'", endpoints = {{ "broker" }} }},
  }},
  fallback = {{ endpoints = {{ "events" }} }},
  enrichments = {{ {{ key = "site", value = "$twin.tags.site", endpoints = {{ "hook" }} }} }},
}}
""")
    client = hub.connected_client(conn)
    levels = ["alert", "info", "debug", "alert", "info", "alert"]
    for n, level in enumerate(levels):
        send(client, {"n": n, "level": level})

    alerts = [n for n, lv in enumerate(levels) if lv == "alert"]
    infos = [n for n, lv in enumerate(levels) if lv == "info"]

    # webhook: the alerts, in order, once each, with the endpoint's enrichment and headers
    hooked = wait_until(lambda: len(r := webhook.records()) >= 3 and r, 20, "three webhook records")
    time.sleep(0.5)
    hooked = webhook.records()
    assert [json.loads(r["body"])["n"] for r in hooked] == alerts, hooked
    assert all(r["properties"]["site"] == "north" for r in hooked), hooked
    assert all(r["systemProperties"]["iothub-connection-device-id"] == device_id for r in hooked)
    assert all(h["x-token"] == "t0ken" and h["content-type"] == "application/json" for h in webhook.headers)

    # NATS JetStream: the alerts, with the device and message source as headers
    msgs = wait_until(lambda: len(m := stream_messages(nats_url)) >= 3 and m, 20, "three stream messages")
    assert [json.loads(d)["n"] for d, _ in msgs] == alerts, msgs
    headers = msgs[0][1]
    assert headers["iothub-connection-device-id"] == device_id, headers
    assert headers["iothub-message-source"] == "Telemetry"
    assert "site" not in headers, "the enrichment was for the webhook only"
    assert headers["Nats-Msg-Id"].startswith("stream:")

    # mosquitto: the infos, on the device's topic
    republished = [got.get(timeout=20) for _ in infos]
    assert [t for t, _ in republished] == [f"fleet/{device_id}/telemetry"] * len(infos)
    assert [json.loads(p)["n"] for _, p in republished] == infos

    # files: alerts and infos, one JSON record per line
    archive = hub.data_dir / "archive" / "archive.1.ndjson"
    lines = wait_until(lambda: archive.exists() and len(ls := archive.read_text().splitlines()) >= 5 and ls,
                       20, "five archived lines")
    assert sorted(json.loads(json.loads(ln)["body"])["n"] for ln in lines) == sorted(alerts + infos)

    # events: only what no route matched (the fallback)
    mine = [r for r in hub.records()
            if r["systemProperties"].get("iothub-connection-device-id") == device_id
            and r["systemProperties"]["iothub-message-source"] == "Telemetry"]
    assert [json.loads(r["body"])["n"] for r in mine] == [2]

    for name, count in (("hook", 3), ("stream", 3), ("broker", 2), ("archive", 5)):
        hub.wait_metric("roost_endpoint_deliveries_total", lambda v, c=count: v == c,
                        f"{name} deliveries", endpoint=name)
        hub.wait_metric("roost_endpoint_lag_records", lambda v: v == 0, f"{name} lag", endpoint=name)
    assert got.empty(), "nothing else was republished"
    sub.loop_stop()
    sub.disconnect()

    # The dispatchers' checkpoints are not consumer groups anyone else may use.
    r = __import__("requests").get(f"{hub.ops_url}/events/groups/$endpoint:hook/records",
                                   headers=hub.ops_headers, timeout=10)
    assert r.status_code == 400, r.text


def test_a_dead_endpoint_holds_nothing_else_and_catches_up_after_restart(hub, tmp_path, webhook):
    device_id = unique_id("dead")
    conn = hub.create_device(device_id)
    apply_routes(hub, tmp_path, f"""
return {{
  endpoints = {{
    hook = {{ kind = "webhook", url = "http://127.0.0.1:{webhook.port}/in", batch = 5 }},
    archive = {{ kind = "file", path = "dead-archive" }},
  }},
  routes = {{ {{ name = "all", condition = true, endpoints = {{ "hook", "archive", "events" }} }} }},
}}
""")
    webhook.down = True
    client = hub.connected_client(conn)
    count = 20
    for n in range(count):
        send(client, {"n": n})  # each acknowledged though the webhook refuses everything

    archive = hub.data_dir / "dead-archive" / "archive.1.ndjson"
    wait_until(lambda: archive.exists() and len(archive.read_text().splitlines()) == count, 20,
               "the file endpoint to take every message while the webhook is down")
    hub.wait_metric("roost_endpoint_failures_total", lambda v: v >= 2, "webhook failures",
                    endpoint="hook", code="refused")
    hub.wait_metric("roost_endpoint_lag_records", lambda v: v > 0, "the webhook's lag", endpoint="hook")
    assert webhook.records() == []

    # It comes back: every message once, in order.
    webhook.down = False
    wait_until(lambda: len(webhook.records()) >= count, 60, "the webhook to catch up")
    hub.wait_metric("roost_endpoint_lag_records", lambda v: v == 0, "no lag", endpoint="hook")
    assert [json.loads(r["body"])["n"] for r in webhook.records()] == list(range(count))

    # The checkpoint is durable: after a restart only new messages go out.
    call_with_timeout(client.shutdown, what="shutdown")
    hub.stop_engine()
    hub.start_engine()
    client = hub.connected_client(conn)
    send(client, {"n": count})
    wait_until(lambda: len(webhook.records()) >= count + 1, 30, "the message after the restart")
    time.sleep(1)
    assert [json.loads(r["body"])["n"] for r in webhook.records()] == list(range(count + 1))
