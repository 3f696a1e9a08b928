"""The Event Hubs-compatible endpoint (issue 10) read by the unmodified `azure-eventhub` Python
client: the connection string from hub.json, `$cbs` put-token with the Event Hubs SDK's SAS
algorithm, `$management` partition ids and properties, and a receiver reading what the Python
device SDK sent, from the start and from an offset, with IoT Hub's annotations."""

from __future__ import annotations

import json
import threading

import pytest
from azure.iot.device import Message

from conftest import call_with_timeout, unique_id, wait_until


def consumer(hub, connection_string: str | None = None, group: str = "$Default"):
    from azure.eventhub import EventHubConsumerClient, TransportType

    return EventHubConsumerClient.from_connection_string(
        connection_string or hub.info["eventhubs_connection_string"],
        consumer_group=group,
        # The SDK's port is fixed (5671); the hub's test port is another.
        custom_endpoint_address=f"sb://{hub.hostname}:{hub.ports['amqp']}",
        transport_type=TransportType.Amqp,
        connection_verify=hub.ca_path,
        retry_total=0,
    )


def telemetry_of(events: list, device_id: str) -> list:
    """The device's telemetry among the events (its connection-state and lifecycle events are
    routed to `events` too)."""
    return [e for e in events
            if e.system_properties.get(b"iothub-connection-device-id") == device_id.encode()
            and e.system_properties.get(b"iothub-message-source") == b"Telemetry"]


def receive(hub, partition_id: str, starting_position, want: int, timeout: float = 30,
            group: str = "$Default", starting_position_inclusive: bool = False,
            owner_level: int | None = None) -> list:
    """What one receiver gets until `want` events or `timeout`; the client's first error is
    raised."""
    client = consumer(hub, group=group)
    got: list = []
    done = threading.Event()
    failed: list = []

    def on_event(_context, event):
        if event is not None:
            got.append(event)
            if len(got) >= want:
                done.set()

    def on_error(_context, error):
        failed.append(error)
        done.set()

    worker = threading.Thread(target=client.receive, daemon=True, kwargs=dict(
        on_event=on_event, on_error=on_error, partition_id=partition_id,
        starting_position=starting_position, starting_position_inclusive=starting_position_inclusive,
        owner_level=owner_level, max_wait_time=1))
    worker.start()
    done.wait(timeout)
    client.close()
    worker.join(15)
    if failed:
        raise failed[0]
    return got


def test_the_event_hubs_client_reads_what_devices_sent(hub):
    device_id = unique_id("eh")
    client = hub.connected_client(hub.create_device(device_id))
    for n in range(3):
        m = Message(json.dumps({"n": n}), content_encoding="utf-8", content_type="application/json",
                    message_id=f"m-{n}")
        m.custom_properties["level"] = "info" if n else "critical"
        call_with_timeout(client.send_message, m, what="send")

    eh = consumer(hub)
    try:
        assert eh.get_partition_ids() == ["0", "1"]
        props = eh.get_eventhub_properties()
        assert props["eventhub_name"] == hub.hostname.split(".")[0]
    finally:
        eh.close()

    mine = [r for r in hub.records() if r["systemProperties"].get("iothub-connection-device-id") == device_id
            and r["systemProperties"]["iothub-message-source"] == "Telemetry"]
    partition = str(mine[0]["partition"])
    offsets = [r["offset"] for r in mine]

    events = telemetry_of(receive(hub, partition, "-1", want=offsets[-1] + 1), device_id)
    assert [json.loads(e.body_as_str())["n"] for e in events] == [0, 1, 2]
    first = events[0]
    assert first.properties[b"level"] == b"critical"
    assert first.system_properties[b"iothub-message-source"] == b"Telemetry"
    assert first.system_properties[b"content-type"] == b"application/json"
    assert first.system_properties[b"message-id"] == b"m-0"
    assert int(first.offset) == offsets[0] and first.sequence_number == offsets[0]
    assert first.enqueued_time is not None

    # From an offset, exclusive: the second and third.
    later = telemetry_of(receive(hub, partition, str(offsets[0]), want=offsets[-1] - offsets[0]), device_id)
    assert [json.loads(e.body_as_str())["n"] for e in later] == [1, 2]

    pp = consumer(hub)
    try:
        info = pp.get_partition_properties(partition)
        assert info["last_enqueued_sequence_number"] >= offsets[-1]
        assert not info["is_empty"]
    finally:
        pp.close()
    hub.wait_metric("roost_amqp_cbs_put_tokens_total", lambda v: v >= 3, "put-tokens", result="ok")


def test_a_wrong_key_is_refused(hub):
    from azure.eventhub.exceptions import AuthenticationError, EventHubError

    cs = hub.info["eventhubs_connection_string"]
    key = cs.split("SharedAccessKey=")[1].split(";")[0]
    wrong = cs.replace(key, "d3Jvbmcta2V5LWZvci10ZXN0cy0wMTIzNDU2Nzg5MDEyMzQ=")
    eh = consumer(hub, wrong)
    try:
        with pytest.raises((AuthenticationError, EventHubError)):
            eh.get_partition_ids()
    finally:
        eh.close()
    hub.wait_metric("roost_amqp_cbs_put_tokens_total", lambda v: v >= 1, "the refused put-token",
                    result="bad_signature")


def test_two_consumer_groups_read_the_same_events_and_an_unknown_one_is_refused(hub):
    from azure.eventhub.exceptions import EventHubError

    created = hub.cli("consumer-group", "create", "analytics")
    assert created.returncode == 0
    groups = json.loads(hub.cli("consumer-group", "list").stdout)["consumerGroups"]
    assert groups == ["$Default", "analytics"], groups
    bad = hub.cli("consumer-group", "create", "bad.", check=False)
    assert bad.returncode != 0 and "consumer group" in bad.stderr, bad.stderr

    device_id = unique_id("cg")
    client = hub.connected_client(hub.create_device(device_id))
    call_with_timeout(client.send_message, Message(json.dumps({"n": 7})), what="send")
    mine = [r for r in hub.records() if r["systemProperties"].get("iothub-connection-device-id") == device_id
            and r["systemProperties"]["iothub-message-source"] == "Telemetry"]
    partition, offset = str(mine[0]["partition"]), mine[0]["offset"]

    # The engine has the group once the epoch carrying it is in force.
    def read(group):
        return telemetry_of(receive(hub, partition, str(offset), want=1, group=group,
                                    starting_position_inclusive=True), device_id)
    results = {}
    threads = [threading.Thread(target=lambda g=g: results.__setitem__(g, read(g))) for g in ("$Default", "analytics")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [json.loads(e.body_as_str())["n"] for e in results["$Default"]] == [7]
    assert [json.loads(e.body_as_str())["n"] for e in results["analytics"]] == [7]

    with pytest.raises(EventHubError):
        receive(hub, partition, "-1", want=1, group="nobody", timeout=10)
    assert hub.cli("consumer-group", "delete", "analytics").returncode == 0
    assert json.loads(hub.cli("consumer-group", "list").stdout)["consumerGroups"] == ["$Default"]


def test_the_hubs_own_events_from_an_enqueued_time(hub):
    """Lifecycle and twin-change events (routed to `events` by the default routes.lua) reach an
    Event Hubs reader with their sources, read from an enqueued time."""
    import datetime

    from azure.iot.hub.models import Twin

    before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=1)
    device_id = unique_id("ehev")
    hub.create_device(device_id)
    hub.registry_manager().update_twin(device_id, Twin(tags={"site": "north"}), "*")
    wanted = {"deviceLifecycleEvents", "twinChangeEvents"}

    def records():
        rs = [r for r in hub.records() if r["systemProperties"].get("iothub-connection-device-id") == device_id
              and r["systemProperties"]["iothub-message-source"] in wanted]
        return rs if {r["systemProperties"]["iothub-message-source"] for r in rs} == wanted else None

    mine = wait_until(records, 15, "the device's lifecycle and twin-change records")
    for partition in sorted({r["partition"] for r in mine}):
        count = sum(1 for r in mine if r["partition"] == partition)
        events = [e for e in receive(hub, str(partition), before, want=10_000, timeout=8)
                  if e.system_properties.get(b"iothub-connection-device-id") == device_id.encode()]
        sources = {e.system_properties[b"iothub-message-source"].decode() for e in events}
        assert sources >= {r["systemProperties"]["iothub-message-source"] for r in mine
                           if r["partition"] == partition}, sources
        assert len([e for e in events if e.system_properties[b"iothub-message-source"].decode() in wanted]) == count
        for e in events:
            assert e.enqueued_time >= before
            if e.system_properties[b"iothub-message-source"] == b"twinChangeEvents":
                assert json.loads(e.body_as_str())["tags"] == {"site": "north"}


class Reader:
    """A receiver running in the background until closed; errors the client reports are kept."""

    def __init__(self, hub, partition_id: str, owner_level: int | None):
        self.client = consumer(hub)
        self.errors: list = []
        self.thread = threading.Thread(target=self.client.receive, daemon=True, kwargs=dict(
            on_event=lambda _c, _e: None, on_error=lambda _c, e: self.errors.append(e),
            partition_id=partition_id, starting_position="-1", owner_level=owner_level, max_wait_time=1))
        self.thread.start()

    def close(self) -> None:
        self.client.close()
        self.thread.join(15)


def test_a_higher_epoch_takes_the_partition_and_a_lower_one_is_refused(hub):
    first = Reader(hub, "0", owner_level=1)
    try:
        hub.wait_metric("roost_amqp_eventhubs_receiver_lag_records", lambda v: v >= 0, "the first receiver",
                        group="$default", partition="0")
        second = Reader(hub, "0", owner_level=2)
        try:
            stolen = wait_until(lambda: first.errors, 15, "the first receiver to lose the partition")
            assert "stolen" in str(stolen[0]).lower() or "disconnect" in type(stolen[0]).__name__.lower(), stolen
            lower = Reader(hub, "0", owner_level=1)
            try:
                refused = wait_until(lambda: lower.errors, 15, "the lower epoch to be refused")
                assert "epoch" in str(refused[0]).lower(), refused
            finally:
                lower.close()
            assert not second.errors, second.errors
        finally:
            second.close()
    finally:
        first.close()
    hub.wait_metric("roost_amqp_refused_total", lambda v: v >= 1, "the refusal", reason="link_stolen")


def test_an_unauthenticated_peer_holds_at_most_four_links(hub):
    """Before a put-token succeeds a connection may attach only the `$cbs` and `$management`
    links, four in all: a fifth attach is refused (the frames here are written by the fuzz seed
    generator's own AMQP encoder)."""
    import socket
    import ssl
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
    from gen_corpus import Described, Ulong, amqp_frame, perf

    ctx = ssl.create_default_context(cafile=hub.ca_path)
    raw = socket.create_connection(("127.0.0.1", hub.ports["amqp"]), timeout=10)
    with ctx.wrap_socket(raw, server_hostname=hub.hostname) as s:
        frames = b"AMQP\x00\x01\x00\x00" + amqp_frame(perf(0x10, ["raw-client", hub.hostname]))
        frames += amqp_frame(perf(0x11, [None, 0, 100, 100]))
        for handle in range(5):
            frames += amqp_frame(perf(0x12, [f"cbs-{handle}", handle, False, None, None,
                                             Described(Ulong(0x28), ["me"]), Described(Ulong(0x29), ["$cbs"])]))
        s.sendall(frames)
        got = b""
        deadline = time.monotonic() + 10
        while b"at most 4 links" not in got and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    assert b"amqp:unauthorized-access" in got and b"at most 4 links" in got, got[-400:]
    assert got.count(b"cbs-") == 5, "every attach answered, the fifth with a refusal"


def test_unauthenticated_amqp_connections_share_the_engines_caps(hub_factory):
    """An AMQP connection counts against the engine-wide pre-authentication caps (with MQTT's)
    until a put-token succeeds; one over the per-address cap is closed before TLS."""
    import socket
    import ssl

    hub = hub_factory(start=False)
    hub.engine_args = ["--max-unauthenticated-per-source", "2"]
    hub.start()
    ctx = ssl.create_default_context(cafile=hub.ca_path)

    def tls():
        raw = socket.create_connection(("127.0.0.1", hub.ports["amqp"]), timeout=5)
        return ctx.wrap_socket(raw, server_hostname=hub.hostname)

    held = [tls(), tls()]
    try:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            tls().sendall(b"AMQP\x00\x01\x00\x00")
        hub.wait_metric("roost_amqp_refused_total", lambda v: v >= 1, "the refused connection",
                        reason="unauthenticated_source_limit")
    finally:
        for s in held:
            s.close()
    # The slots come back when those connections end: a client authenticates as usual.
    def reads():
        c = consumer(hub)
        try:
            return c.get_partition_ids()
        except Exception:  # noqa: BLE001 - retried until the engine has seen the closes
            return None
        finally:
            c.close()
    assert wait_until(reads, 10, "a connection after the held ones closed") == ["0", "1"]
