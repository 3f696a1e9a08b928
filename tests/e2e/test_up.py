"""`roost up` on custom ports: control and engine as child processes, hub.json, the CLI, the SDK,
and a clean stop on SIGINT (Ctrl-C) that leaves no process behind."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest
import requests
from azure.iot.device import Message

from conftest import (
    READY_TIMEOUT,
    STOP_TIMEOUT,
    call_with_timeout,
    create_device_via_cli,
    free_port,
    http_ok,
    kill_process_group,
    make_device_client,
    parse_connection_string,
    read_hub_json,
    record_body,
    register_logs,
    shutdown_all_clients,
    shutdown_client,
    spawn,
    stop_process,
    tail_events_via_cli,
    tcp_refused,
    unique_id,
    wait_until,
)


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a live process, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2])


def alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def children_of(pid: int) -> list[int]:
    return [p for p in all_pids() if (st := proc_stat(p)) and st[1] == pid and alive(p)]


def group_members(pgid: int) -> list[int]:
    return [p for p in all_pids() if (st := proc_stat(p)) and st[2] == pgid and alive(p)]


def test_roost_up(roost_binary, tmp_path, request):
    data = tmp_path / "data"
    log = tmp_path / "up.log"
    cli_log = tmp_path / "cli.log"
    register_logs(request.node, [("up", log), ("cli", cli_log)])
    ports = {name: free_port() for name in ("mqtt", "service", "ops", "control_ops", "link", "amqp", "https")}
    up = spawn(roost_binary, [
        "up", "--data-dir", str(data), "--hostname", "localhost",
        "--mqtt", f"127.0.0.1:{ports['mqtt']}",
        "--service", f"127.0.0.1:{ports['service']}",
        "--ops", f"127.0.0.1:{ports['ops']}",
        "--control-ops", f"127.0.0.1:{ports['control_ops']}",
        "--link", f"127.0.0.1:{ports['link']}",
        "--amqp", f"127.0.0.1:{ports['amqp']}",
        "--https", f"127.0.0.1:{ports['https']}",
        "--cores", "2",
    ], log)
    children: list[int] = []
    try:
        # ---- ready: both health endpoints, and hub.json with every port we asked for
        def ready() -> bool:
            assert up.poll() is None, f"roost up exited with {up.returncode}"
            return http_ok(f"http://127.0.0.1:{ports['control_ops']}/healthz") and \
                http_ok(f"http://127.0.0.1:{ports['ops']}/healthz")

        wait_until(ready, READY_TIMEOUT, "roost up: control and engine /healthz")

        def hub_json() -> dict | None:
            info = read_hub_json(data)
            p = info.get("ports", {})
            return info if p.get("mqtt") == ports["mqtt"] and p.get("service") == ports["service"] else None

        info = wait_until(hub_json, READY_TIMEOUT, "hub.json with the custom ports")
        assert info["hostname"] == "localhost"
        assert info["ports"]["ops"] == ports["ops"]
        assert info["ports"]["https"] == ports["https"]
        assert info["service_url"].endswith(f":{ports['service']}")
        assert info["ops_url"].endswith(f":{ports['ops']}")
        assert Path(info["ca"]).is_absolute() and Path(info["ca"]).is_file()
        assert info["service_connection_string"].startswith("HostName=localhost;SharedAccessKeyName=iothubowner;")

        # ---- secrets: private files, not printed, the ops ports ask for the token
        assert stat.S_IMODE(os.stat(data / "hub.json").st_mode) == 0o600
        for d in (data, data / "certs", data / "engine", data / "control"):
            assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
        owner_key = parse_connection_string(info["service_connection_string"])["SharedAccessKey"]
        # `up` prints its summary once both processes are healthy: wait for all of it.
        def summary() -> str | None:
            text = log.read_text()
            return text if "Ctrl-C stops the hub." in text else None

        printed = wait_until(summary, READY_TIMEOUT, "roost up's summary")
        assert "hub.json" in printed and owner_key not in printed and info["ops_token"] not in printed
        for port in (ports["ops"], ports["control_ops"]):
            url = f"http://127.0.0.1:{port}/metrics"
            assert requests.get(url, timeout=5).status_code == 401
            bad = requests.get(url, headers={"Authorization": "Bearer wrong"}, timeout=5)
            assert bad.status_code == 401
            ok = requests.get(url, headers={"Authorization": f"Bearer {info['ops_token']}"}, timeout=5)
            assert ok.status_code == 200 and "roost_" in ok.text

        children = children_of(up.pid)
        assert len(children) >= 2, f"`roost up` should run control and engine as child processes: {children}"

        # ---- a device created with the CLI connects with the SDK and its message is tailed
        device_id = unique_id("up")
        conn_str = create_device_via_cli(roost_binary, data, device_id, cli_log)
        ca_pem = Path(info["ca"]).read_text()

        def connected():
            from azure.iot.device.exceptions import CredentialError

            client = make_device_client(conn_str, ca_pem, ports["mqtt"])
            try:
                call_with_timeout(client.connect, what="connect")
                return client
            except CredentialError:
                shutdown_client(client)
                return None

        client = wait_until(connected, 15, "the new device to connect", interval=0.2)
        body = f"hello from {device_id}"
        call_with_timeout(client.send_message, Message(body), what="send_message")
        shutdown_client(client)
        # The default routes.lua also sends the device's lifecycle and connection-state events to
        # `events`; the telemetry is the one record whose source says so.
        every = tail_events_via_cli(roost_binary, data, ["--from", "earliest", "--max", "50"], cli_log)
        tailed = [r for r in every if r["systemProperties"].get("iothub-message-source") == "Telemetry"]
        assert len(tailed) == 1, every
        assert record_body(tailed[0]) == body.encode(), tailed[0]
        assert tailed[0]["systemProperties"]["iothub-connection-device-id"] == device_id

        # ---- Ctrl-C: `up` and both children exit, nothing is left listening
        rc = stop_process(up, signal.SIGINT, timeout=STOP_TIMEOUT)
        assert rc in (0, 130), f"roost up exited with {rc} on SIGINT"
        wait_until(lambda: not any(alive(c) for c in children), 10, f"children {children} to exit")
        wait_until(lambda: not group_members(up.pid), 10, "no process left in roost up's process group")
        for name in ("mqtt", "service", "ops", "control_ops", "amqp"):
            assert tcp_refused(ports[name]), f"{name} port {ports[name]} still accepts connections"
    finally:
        shutdown_all_clients()
        kill_process_group(up)
        for c in children:
            if alive(c):
                try:
                    os.kill(c, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_a_port_it_may_not_bind_is_named_with_the_flag_to_choose_another(roost_binary):
    """Binding IoT Hub's port 443 needs root or CAP_NET_BIND_SERVICE: without them `roost up`
    does not start, and the engine's error names the flag that picks another port. Run as an
    unprivileged user when the tests run as root (setpriv: user nobody, no capabilities)."""
    import shutil
    import subprocess
    import tempfile

    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.fail("setpriv (util-linux) is needed to run this as an unprivileged user", pytrace=False)
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                  "--bounding-set=-all"]
    else:
        prefix = []
    work = Path(tempfile.mkdtemp(prefix="roost-443-", dir="/tmp"))
    try:
        os.chmod(work, 0o777)
        # The unprivileged user may not reach the build's directory: run a link of the binary
        # (a copy across file systems) from the work directory; `up` starts its children from it.
        binary = work / "roost"
        try:
            os.link(roost_binary, binary)
        except OSError:
            shutil.copy2(roost_binary, binary)
        ports = {name: free_port() for name in ("mqtt", "service", "ops", "control_ops", "link", "amqp")}
        cp = subprocess.run([
            *prefix, str(binary), "up", "--data-dir", str(work / "data"), "--hostname", "localhost",
            "--mqtt", f"127.0.0.1:{ports['mqtt']}", "--https", "127.0.0.1:443",
            "--service", f"127.0.0.1:{ports['service']}", "--ops", f"127.0.0.1:{ports['ops']}",
            "--control-ops", f"127.0.0.1:{ports['control_ops']}", "--link", f"127.0.0.1:{ports['link']}",
            "--amqp", f"127.0.0.1:{ports['amqp']}", "--cores", "1",
        ], capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = cp.stdout + cp.stderr
    assert cp.returncode != 0, out[-2000:]
    assert "cannot listen on 127.0.0.1:443 (https)" in out and "choose another with --https ADDR" in out, out[-2000:]
