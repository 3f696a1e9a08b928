"""Routing (issue 9) with the official Python device SDK: `roost routes check|apply|test`,
conditions in IoT Hub's syntax over the body and twin tags, the fallback switched off, enrichments
in the built-in endpoint, plugins on the message path (one that changes the message, one that
loops forever), epochs refused with the line of the error while the previous one keeps running,
and a hot reload under traffic that loses and duplicates nothing in `events`."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

from azure.iot.device import Message
from azure.iot.hub.models import Twin

from conftest import call_with_timeout, record_body, unique_id, wait_until

REPO = Path(__file__).resolve().parents[2]

ROUTES = """
return {
  plugins = {
    { use = "redact", config = { paths = { "password" } } },
    { use = "stall", on_error = "skip" },
  },
  routes = {
    { name = "hot", condition = "$body.temperature > 30 AND $twin.tags.site = 'north'",
      endpoints = { "events" } },
    { name = "flagged", condition = function(msg, device) return msg.props.flag == "yes" end,
      endpoints = { "events" } },
  },
  fallback = false,
  enrichments = {
    { key = "site", value = "$twin.tags.site", endpoints = { "events" } },
    { key = "hub", value = "$iothubname", endpoints = { "events" } },
  },
}
"""

# A plugin that loops forever on messages that ask for it: it must cost those messages their
# plugin step, not the shard.
STALL = """
return {
  on_message = function(msg, device, conf, state)
    if msg.props.stall == "yes" then while true do end end
  end,
}
"""


def write_routes(tmp_path: Path, routes: str = ROUTES) -> Path:
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    if not (plugins / "redact").exists():
        shutil.copytree(REPO / "plugins" / "redact", plugins / "redact")
    stall = plugins / "stall"
    stall.mkdir(exist_ok=True)
    (stall / "handler.lua").write_text(STALL)
    (stall / "schema.lua").write_text("return {}")
    path = tmp_path / "routes.lua"
    path.write_text(routes)
    return path


def json_message(body: dict, **props: str) -> Message:
    m = Message(json.dumps(body), content_encoding="utf-8", content_type="application/json")
    m.custom_properties.update(props)
    return m


def telemetry(hub, device_id: str) -> list[dict]:
    return [r for r in hub.records()
            if r["systemProperties"].get("iothub-connection-device-id") == device_id
            and r["systemProperties"]["iothub-message-source"] == "Telemetry"]


def test_check_reports_errors_on_their_line(hub_factory, tmp_path):
    hub = hub_factory(start=False)
    ok = hub_cli_plain(hub, "routes", "check", str(REPO / "routes.lua"))
    summary = json.loads(ok.stdout)
    assert [r["name"] for r in summary["routes"]] == ["twin-changes", "lifecycle", "connection-state", "file-uploads"]
    assert summary["fallback"] == ["events"]
    bad = tmp_path / "bad.lua"
    bad.write_text("return {\n  routes = {\n    { name = \"a\",\n      endpoints = { \"nowhere\" } },\n  },\n}\n")
    r = hub_cli_plain(hub, "routes", "check", str(bad), check=False)
    assert r.returncode != 0
    assert "bad.lua:4: route \"a\": unknown endpoint \"nowhere\"" in r.stderr, r.stderr


def hub_cli_plain(hub, *args: str, check: bool = True):
    """`roost <args>` without `--data-dir` (local commands)."""
    from conftest import run_cli
    return run_cli(hub.binary, list(args), hub.cli_log, 30, check)


def test_routes_conditions_enrichments_and_plugins_end_to_end(hub, tmp_path):
    device_id = unique_id("rt")
    conn = hub.create_device(device_id)
    rm = hub.registry_manager()
    rm.update_twin(device_id, Twin(tags={"site": "north"}), "*")
    path = write_routes(tmp_path)

    applied = json.loads(hub.cli("routes", "apply", str(path)).stdout)
    assert applied["version"] == 2, applied
    assert all(e["epochHash"] == applied["hash"] for e in applied["engines"]), applied

    client = hub.connected_client(conn)
    sends = [
        json_message({"temperature": 35, "password": "hunter2", "n": 1}),  # hot: stored, redacted
        json_message({"temperature": 20, "n": 2}),                          # matches nothing: dropped
        json_message({"temperature": 20, "n": 3}, flag="yes"),              # the Lua condition
        json_message({"temperature": 40, "n": 4}, stall="yes"),             # the plugin loops: skipped
        json_message({"temperature": 31, "n": 5}),                          # after the loop: stored
    ]
    for m in sends:
        call_with_timeout(client.send_message, m, what="send")

    got = wait_until(lambda: (t := telemetry(hub, device_id)) and len(t) >= 4 and t, 20,
                     "four routed messages")
    bodies = [json.loads(record_body(r)) for r in got]
    assert [b["n"] for b in bodies] == [1, 3, 4, 5], bodies
    assert bodies[0]["password"] == "***", "the redact plugin ran before the store"
    for r in got:
        assert r["properties"]["site"] == "north", r["properties"]
        assert r["properties"]["hub"] == hub.hostname.split(".")[0]

    # Counters reach the metrics on each shard's next tick (100 ms).
    at_least = lambda n: lambda v: v >= n  # noqa: E731
    hub.wait_metric("roost_routing_route_matches_total", at_least(3), "hot matches", route="hot")
    hub.wait_metric("roost_routing_route_matches_total", at_least(1), "flagged matches", route="flagged")
    hub.wait_metric("roost_routing_unrouted_total", at_least(1), "unrouted")
    hub.wait_metric("roost_routing_plugin_errors_total", at_least(1), "stall's budget errors",
                    plugin="stall", code="budget")
    hub.wait_metric("roost_routing_plugin_runs_total", at_least(5), "redact runs", plugin="redact")

    test = tmp_path / "cases.json"
    test.write_text(json.dumps([
        {"name": "hot", "message": {"body": {"temperature": 35}}, "tags": {"site": "north"}},
        {"name": "cold", "message": {"body": {"temperature": 5}}, "tags": {"site": "north"}},
    ]))
    lines = [json.loads(line) for line in hub_cli_plain(hub, "routes", "test", str(path), "--cases", str(test),
                                                        "--plugins", str(tmp_path / "plugins")).stdout.splitlines()]
    assert lines[0]["routes"] == ["hot"] and lines[0]["endpoints"] == ["events"], lines
    assert lines[0]["enrichments"]["events"]["site"] == "north"
    assert lines[1]["verdict"] == "unrouted" and lines[1]["endpoints"] == [], lines


def test_a_refused_routing_leaves_the_previous_one_running(hub, tmp_path):
    device_id = unique_id("rf")
    conn = hub.create_device(device_id)
    bad = write_routes(tmp_path, "return {\n  routes = {\n    { name = \"a\", condition = \"$body >\", endpoints = { \"events\" } },\n  },\n}\n")
    r = hub.cli("routes", "apply", str(bad), check=False)
    assert r.returncode != 0
    assert "routes.lua:3: route \"a\": invalid condition" in r.stderr, r.stderr
    status = json.loads(hub.cli("routes", "show").stdout)
    assert status["version"] == 1, "nothing was stored"
    client = hub.connected_client(conn)
    call_with_timeout(client.send_message, json_message({"n": 1}), what="send")
    wait_until(lambda: len(telemetry(hub, device_id)) == 1, 15, "the default routing still runs")


def test_a_hot_reload_under_traffic_loses_and_duplicates_nothing(hub, tmp_path):
    device_id = unique_id("hr")
    conn = hub.create_device(device_id)
    # Two routings that both store every telemetry message in `events`, by different routes.
    a = write_routes(tmp_path, 'return { routes = { { name = "all-a", condition = true, endpoints = { "events" } } } }')
    b_dir = tmp_path / "b"
    b_dir.mkdir()
    b = write_routes(b_dir, 'return { routes = { { name = "all-b", condition = "1 = 1", endpoints = { "events" } } }, fallback = false }')
    client = hub.connected_client(conn)
    total = 300
    done = threading.Event()

    def send_all() -> None:
        for n in range(total):
            call_with_timeout(client.send_message, json_message({"n": n}), what="send")
        done.set()

    sender = threading.Thread(target=send_all)
    sender.start()
    applied = 0
    while not done.is_set() and applied < 6:
        hub.cli("routes", "apply", str(a if applied % 2 == 0 else b))
        applied += 1
    sender.join(timeout=120)
    assert done.is_set(), "the sender finished"
    assert applied >= 2, "the routing changed while messages flowed"
    got = wait_until(lambda: (t := telemetry(hub, device_id)) and len(t) >= total and t, 30, f"{total} messages")
    ns = sorted(json.loads(record_body(r))["n"] for r in got)
    assert ns == list(range(total)), f"lost or duplicated: {len(ns)} records"


def test_conditions_and_enrichments_read_twin_properties(hub, tmp_path):
    """`$twin.properties.desired…` and `.reported…` in conditions and enrichments: the device's
    reported patch and the service's desired patch reach the engines' registry view."""
    device_id = unique_id("tp")
    conn = hub.create_device(device_id)
    rm = hub.registry_manager()
    rm.update_twin(device_id, Twin(properties={"desired": {"mode": "eco"}}), "*")
    client = hub.connected_client(conn)
    call_with_timeout(client.patch_twin_reported_properties, {"fw": {"version": "2.0"}}, what="reported patch")
    wait_until(lambda: hub.ops_get(f"/registry/devices/{device_id}")["properties"]
               .get("reported", {}).get("fw") == {"version": "2.0"}, 15,
               "the reported properties in the engine's registry view")
    entry = hub.ops_get(f"/registry/devices/{device_id}")
    assert entry["properties"]["desired"]["mode"] == "eco", entry
    path = write_routes(tmp_path, """
return {
  routes = {
    { name = "new-fw", condition = "$twin.properties.reported.fw.version = '2.0' AND $twin.properties.desired.mode = 'eco'",
      endpoints = { "events" } },
  },
  fallback = false,
  enrichments = {
    { key = "mode", value = "$twin.properties.desired.mode", endpoints = { "events" } },
    { key = "fw", value = "$twin.properties.reported.fw", endpoints = { "events" } },
    { key = "absent", value = "$twin.properties.reported.nothing", endpoints = { "events" } },
  },
}
""")
    hub.cli("routes", "apply", str(path))
    call_with_timeout(client.send_message, json_message({"n": 1}), what="send")
    got = wait_until(lambda: telemetry(hub, device_id), 15, "the routed message")
    props = got[0]["properties"]
    assert props["mode"] == "eco" and json.loads(props["fw"]) == {"version": "2.0"}, props
    assert props["absent"] == "$twin.properties.reported.nothing", props

    # A reported value the condition does not take: the next message matches nothing.
    call_with_timeout(client.patch_twin_reported_properties, {"fw": {"version": "1.0"}}, what="reported patch")
    wait_until(lambda: hub.ops_get(f"/registry/devices/{device_id}")["properties"]["reported"]["fw"]
               == {"version": "1.0"}, 15, "the new reported value in the registry view")
    call_with_timeout(client.send_message, json_message({"n": 2}), what="send")
    hub.wait_metric("roost_routing_unrouted_total", lambda v: v >= 1, "the unmatched message")
    assert [json.loads(record_body(r))["n"] for r in telemetry(hub, device_id)] == [1]
