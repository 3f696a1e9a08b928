"""The data plane keeps working without the control plane (DESIGN.md §2): devices keep sending
while control is down, an engine restarted with control down boots from its persisted registry
replica, and the control link comes back when control does."""

from __future__ import annotations

import threading
import time

from azure.iot.device import Message

from conftest import (
    call_with_timeout,
    device_connection_string,
    random_key,
    record_body,
    shutdown_client,
    telemetry_of,
    unique_id,
    wait_until,
)

LINK = "roost_link_connected"
SEQ = "roost_registry_sequence"
EPOCH = "roost_link_epoch_version"
EPOCHS = "roost_link_epochs_total"


class Sender(threading.Thread):
    """Sends a telemetry message every ~50 ms until stopped; records (time, body) of each PUBACKed
    send and stops at the first error."""

    def __init__(self, client, prefix: str):
        super().__init__(daemon=True, name=f"sender-{prefix}")
        self.client = client
        self.prefix = prefix
        self.stop_event = threading.Event()
        self.sent: list[tuple[float, bytes]] = []
        self.errors: list[BaseException] = []

    def run(self) -> None:
        i = 0
        while not self.stop_event.is_set():
            body = f"{self.prefix}-{i}"
            try:
                call_with_timeout(self.client.send_message, Message(body), timeout=15, what=f"send {body}")
            except BaseException as e:  # noqa: BLE001 - reported by the test
                self.errors.append(e)
                return
            self.sent.append((time.monotonic(), body.encode()))
            i += 1
            self.stop_event.wait(0.05)

    def finish(self) -> None:
        self.stop_event.set()
        self.join(20)
        assert not self.is_alive(), "sender did not stop"
        assert not self.errors, f"send failed: {self.errors[0]!r}"

    def sent_after(self, t: float) -> int:
        return sum(1 for ts, _ in self.sent if ts > t)


def bodies(hub, device_id: str) -> set[bytes]:
    return {record_body(r) for r in telemetry_of(hub.records(), device_id)}


def test_engine_keeps_working_without_control(hub):
    device_id = unique_id("static")
    conn_str = hub.create_device(device_id)
    client = hub.connected_client(conn_str)
    hub.wait_metric(LINK, lambda v: v == 1, "== 1 (control link up)")
    # Control sent its config epoch after the engine's Hello; the engine applied it.
    hub.wait_metric(EPOCH, lambda v: v == 1, "== 1 (control's epoch in force)")
    assert hub.metric_sum(EPOCHS, result="applied") >= 1

    # ---- stop control while the device is sending; sends keep succeeding and landing
    sender = Sender(client, "during")
    sender.start()
    wait_until(lambda: len(sender.sent) >= 3 or sender.errors, 15, "first sends")
    hub.stop_control()
    stopped_at = time.monotonic()
    hub.wait_metric(LINK, lambda v: v == 0, "== 0 (control stopped)", timeout=30)
    wait_until(lambda: sender.sent_after(stopped_at) >= 5 or sender.errors or not sender.is_alive(), 20,
               "5 sends acknowledged after control exited")
    sender.finish()
    assert sender.sent_after(stopped_at) >= 5
    assert client.connected
    sent = {b for _, b in sender.sent}
    assert sent <= bodies(hub, device_id), "messages sent while control was down are missing"

    # ---- restart the engine with control still down: the known device connects and sends
    shutdown_client(client)
    seq_before = hub.metric_sum(SEQ)
    assert seq_before > 0, f"{SEQ} should count the registry changes the engine has applied"
    hub.kill_engine()
    hub.start_engine()
    assert hub.metric_sum(LINK) == 0
    assert hub.metric_sum(SEQ) >= seq_before, "the engine did not boot from its persisted registry replica"
    # ... and its persisted epoch, through the same apply path, before any link.
    assert hub.metric_sum(EPOCH) == 1, "the engine did not boot with its persisted config epoch"
    assert hub.metric_sum(EPOCHS, result="applied") == 0, "nothing came from control yet"
    client = hub.connected_client(conn_str)
    call_with_timeout(client.send_message, Message("after engine restart"), what="send after engine restart")
    stored = bodies(hub, device_id)
    assert sent | {b"after engine restart"} <= stored, "records missing after the engine restart"
    # Unknown devices are still refused (the replica does not fail open).
    hub.assert_refused(device_connection_string(hub.hostname, unique_id("stranger"), random_key()))

    # ---- control comes back: the link reconnects and registry changes flow again
    hub.start_control()
    hub.wait_metric(LINK, lambda v: v == 1, "== 1 (control back)", timeout=30)
    seq = hub.metric_sum(SEQ)
    newcomer = hub.create_device(unique_id("newcomer"))
    hub.wait_metric(SEQ, lambda v: v > seq, f"> {seq} (the new device's delta reached the engine)", timeout=15)
    # Hello carried the epoch's hash, so control sent no epoch: the engine already runs it. (An
    # epoch sent after Hello would have been applied, and counted, before this later delta.)
    assert hub.metric_sum(EPOCHS) == 0, "control re-sent an epoch the engine already runs"
    shutdown_client(hub.connected_client(newcomer))
    # The device connected while control was down was not disturbed by control's return.
    assert client.connected
    call_with_timeout(client.send_message, Message("after control restart"), what="send after control restart")
    assert b"after control restart" in bodies(hub, device_id)
