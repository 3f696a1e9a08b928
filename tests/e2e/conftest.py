"""Fixtures and helpers for the roost end-to-end tests.

The tests start the real `roost` binary (control and engine as separate processes, or `roost up`)
on free 127.0.0.1 ports with a temporary data directory, and drive it with the unmodified official
Python SDKs (`azure-iot-device`, `azure-iot-hub`), raw paho-mqtt and raw HTTP.

Binary: $ROOST_BIN, else $CARGO_TARGET_DIR/debug/roost, else <repo>/target/debug/roost; the load
generator: $BENCH_BIN, else roost-bench beside it.

Readiness is always a poll with a deadline (health endpoints, metrics, registry state), never a
fixed sleep. Every process a test starts is killed at teardown, and the tail of its log is attached
to the report of a failing test.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import hmac
import json
import os
import queue
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import paho.mqtt.client as paho
import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]

HUB_HOSTNAME = "localhost"
# The Python device SDK hardcodes these ports; conftest redirects them (see _redirecting_connect):
# MQTT over TLS, and MQTT over WebSockets (`websockets=True`).
IOTHUB_MQTT_PORT = 8883
IOTHUB_HTTPS_PORT = 443
ENGINE_CORES = 2

READY_TIMEOUT = 60.0  # process start until /healthz answers 200
STOP_TIMEOUT = 20.0  # SIGTERM / SIGINT until the process has exited
SDK_TIMEOUT = 30.0  # one SDK call (connect, send_message, shutdown)
CLI_TIMEOUT = 30.0  # one `roost device|events ...` invocation
METRIC_TIMEOUT = 10.0  # metrics may lag ~0.5 s; poll up to this long
STATE_TIMEOUT = 15.0  # registry-visible state (connectionState, deltas reaching the engine)


# --------------------------------------------------------------------------------------------
# The binary


def roost_bin() -> Path:
    """Path of the roost binary under test (see the module docstring)."""
    explicit = os.environ.get("ROOST_BIN")
    if explicit:
        return Path(explicit).resolve()
    target = os.environ.get("CARGO_TARGET_DIR")
    base = Path(target).resolve() if target else REPO_ROOT / "target"
    return base / "debug" / "roost"


def bench_bin() -> Path:
    """roost-bench, the load generator: $BENCH_BIN, else next to the roost binary."""
    explicit = os.environ.get("BENCH_BIN")
    if explicit:
        return Path(explicit).resolve()
    return roost_bin().parent / "roost-bench"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("ROOST_LOG", "info")
    env.setdefault("RUST_BACKTRACE", "1")
    return env


# --------------------------------------------------------------------------------------------
# Small utilities

_handed_out_ports: set[int] = set()
_port_lock = threading.Lock()


def free_port() -> int:
    """A 127.0.0.1 port that is currently free for both TCP and UDP (the control link is QUIC),
    and that this test process has not handed out before."""
    with _port_lock:
        for _ in range(200):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                tcp.bind(("127.0.0.1", 0))
                port = tcp.getsockname()[1]
                if port in _handed_out_ports:
                    continue
                try:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                        udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out_ports.add(port)
            return port
    raise RuntimeError("could not find a free port")


def unique_id(prefix: str) -> str:
    """A device id no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> Any:
    """Poll `predicate` until it returns a truthy value (returned) or the deadline passes
    (AssertionError). Exceptions raised by the predicate count as "not yet" and the last one is
    reported on timeout."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    last_value: Any = None
    while True:
        try:
            last_value = predicate()
            if last_value:
                return last_value
        except Exception as e:  # noqa: BLE001 - "not yet", reported on timeout
            last_error = e
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}; "
                f"last value: {last_value!r}; last error: {last_error!r}"
            )
        time.sleep(interval)


def call_with_timeout(fn: Callable[..., Any], *args: Any, timeout: float = SDK_TIMEOUT,
                      what: str | None = None, **kwargs: Any) -> Any:
    """Run a blocking call (the SDKs have no timeout of their own on most operations) in a daemon
    thread; re-raise its exception, or fail if it has not returned after `timeout` seconds."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True, name=f"call:{what or fn}")
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise AssertionError(f"{what or getattr(fn, '__qualname__', fn)} did not return within {timeout:.0f}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def tail_file(path: Path, lines: int = 80) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    text = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        return False


def tcp_refused(port: int) -> bool:
    """True if nothing accepts TCP connections on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) != 0


# --------------------------------------------------------------------------------------------
# Processes: every process a test starts is registered, and killed at teardown (and at exit).

_live_procs: set[subprocess.Popen] = set()
_live_lock = threading.Lock()


def spawn(binary: Path, args: list[str], log_path: Path) -> subprocess.Popen:
    """Start `binary args...` in its own session (so its whole process group can be killed),
    appending stdout and stderr to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n===== {time.strftime('%H:%M:%S')} {binary} {' '.join(args)} =====\n".encode())
        log.flush()
        proc = subprocess.Popen(
            [str(binary), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=_child_env(),
        )
    with _live_lock:
        _live_procs.add(proc)
    return proc


def kill_process_group(proc: subprocess.Popen | None) -> None:
    """SIGKILL the process and everything in its process group, then reap it."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    with _live_lock:
        _live_procs.discard(proc)


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
    """Send `sig` to the process (not its group) and wait for it to exit; returns the exit code.
    Fails (after SIGKILLing it) if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(proc)
        raise AssertionError(f"pid {proc.pid} did not exit within {timeout:.0f}s of signal {sig}")
    with _live_lock:
        _live_procs.discard(proc)
    return rc


@atexit.register
def _kill_leftovers() -> None:
    with _live_lock:
        procs = list(_live_procs)
    for p in procs:
        kill_process_group(p)


def run_cli(binary: Path, args: list[str], log_path: Path, timeout: float = CLI_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run a short-lived `roost` command, log it, and (with check) fail on a non-zero exit."""
    try:
        cp = subprocess.run(
            [str(binary), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_child_env(),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"`roost {' '.join(args)}` did not finish within {timeout:.0f}s") from e
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== {time.strftime('%H:%M:%S')} roost {' '.join(args)} -> rc={cp.returncode}\n")
        log.write(f"--- stdout\n{cp.stdout}--- stderr\n{cp.stderr}")
    if check and cp.returncode != 0:
        raise AssertionError(
            f"`roost {' '.join(args)}` exited {cp.returncode}\nstdout:\n{cp.stdout}\nstderr:\n{cp.stderr}"
        )
    return cp


def read_hub_json(data_dir: Path) -> dict:
    """Parse D/hub.json (raises if missing or half-written; callers poll)."""
    return json.loads((Path(data_dir) / "hub.json").read_text())


# --------------------------------------------------------------------------------------------
# Authentication helpers (wire spec §1)


def parse_connection_string(cs: str) -> dict[str, str]:
    """`k=v;k=v`, each pair split at its first `=` (keys may contain `=` padding in values)."""
    out = {}
    for part in cs.strip().split(";"):
        if part:
            k, _, v = part.partition("=")
            out[k] = v
    return out


def device_connection_string(hostname: str, device_id: str, key: str) -> str:
    return f"HostName={hostname};DeviceId={device_id};SharedAccessKey={key}"


def random_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def _sign(key_b64: str, sr: str, se: str) -> str:
    digest = hmac.new(base64.b64decode(key_b64), f"{sr}\n{se}".encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def device_sas_token(hostname: str, device_id: str, key: str, ttl: int = 3600) -> str:
    """A device SAS token exactly as the Python device SDK builds it:
    sr=quote(host/devices/d, safe=""), sig=quote(b64, safe=""), fields sr,sig,se."""
    sr = urllib.parse.quote(f"{hostname}/devices/{device_id}", safe="")
    se = str(int(time.time()) + ttl)
    sig = urllib.parse.quote(_sign(key, sr, se), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={se}"


def service_sas_token(hostname: str, policy: str, key: str, ttl: int = 3600) -> str:
    """A policy SAS token exactly as the Python service SDK (REST) builds it:
    sr=quote_plus(host), sig=quote(b64) with `/` left raw, fields sr,sig,se,skn."""
    sr = urllib.parse.quote_plus(hostname)
    se = str(int(time.time()) + ttl)
    sig = urllib.parse.quote(_sign(key, sr, se))
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={policy}"


def mqtt_username(hostname: str, device_id: str) -> str:
    return f"{hostname}/{device_id}/?api-version=2021-04-12&DeviceClientType=roost-e2e"


def _mqtt_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return len(b).to_bytes(2, "big") + b


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_connect_packet(client_id: str, username: str, password: str, keepalive: int,
                        clean_session: bool = False) -> bytes:
    """An MQTT 3.1.1 CONNECT packet with username and password."""
    flags = 0x80 | 0x40 | (0x02 if clean_session else 0)
    variable = _mqtt_str("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big")
    payload = _mqtt_str(client_id) + _mqtt_str(username) + _mqtt_str(password)
    body = variable + payload
    return bytes([0x10]) + _remaining_length(len(body)) + body


def read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"connection closed after {buf!r}, expected {n} bytes")
        buf += chunk
    return buf


def wait_eof(sock: socket.socket) -> bytes:
    """Read until the peer closes (EOF or reset); returns what came before. socket.timeout
    propagates (a test failure)."""
    extra = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError):
            return extra
        if not chunk:
            return extra
        extra += chunk


def telemetry_topic(device_id: str, props: dict[str, str] | None = None) -> str:
    """`devices/{d}/messages/events/{bag}` with the bag URL-encoded as the Python SDK does."""
    bag = urllib.parse.urlencode(list((props or {}).items()), quote_via=urllib.parse.quote)
    return f"devices/{device_id}/messages/events/{bag}"


# --------------------------------------------------------------------------------------------
# Port redirect for the Python device SDK (wire spec §9).
#
# azure-iot-device 2.14.0 `MQTTTransport.connect` calls
#     self._mqtt_client.connect(host=self._hostname, port=8883, keepalive=self._keep_alive)
# on a paho `Client`; paho's `connect` stores host/port (connect_async) and opens the socket in
# `reconnect()` using the stored port. Replacing port 8883 in `Client.connect` therefore sends the
# SDK to the test's engine, while the TLS server name (and the SAS `sr`, and the MQTT username)
# stay `localhost`. Raw paho clients in the tests connect to the real port and are not affected.

# The target port lives on the paho class itself, so the patch and its state are shared even if
# this file were imported twice (as pytest's conftest and as the `conftest` module).

if not hasattr(paho.Client, "_roost_original_connect"):
    paho.Client._roost_original_connect = paho.Client.connect
    paho.Client._roost_redirect_port = None
    paho.Client._roost_redirect_https_port = None

    def _redirecting_connect(self, host, port=1883, *args, **kwargs):
        target = paho.Client._roost_redirect_port
        if port == IOTHUB_MQTT_PORT and target:
            port = target
        https = paho.Client._roost_redirect_https_port
        if port == IOTHUB_HTTPS_PORT and https:
            port = https
        return paho.Client._roost_original_connect(self, host, port, *args, **kwargs)

    paho.Client.connect = _redirecting_connect


def redirect_mqtt_to(port: int, https_port: int | None = None) -> None:
    """Make every paho connect to port 8883 in this process (i.e. the device SDK's) go to `port`
    instead, and to port 443 (MQTT over WebSockets) to `https_port`. Process-wide: the last call
    wins, so use one hub's ports at a time."""
    paho.Client._roost_redirect_port = port
    paho.Client._roost_redirect_https_port = https_port


_device_clients: list[Any] = []


def _make_client(cls: Any, conn_str: str, ca_pem: str, mqtt_port: int, https_port: int | None = None,
                 **kwargs: Any):
    redirect_mqtt_to(mqtt_port, https_port)
    kwargs.setdefault("server_verification_cert", ca_pem)
    kwargs.setdefault("connection_retry", False)
    client = cls.create_from_connection_string(conn_str, **kwargs)
    _device_clients.append(client)
    return client


def make_device_client(conn_str: str, ca_pem: str, mqtt_port: int, **kwargs: Any):
    """An `IoTHubDeviceClient` (MQTT over TLS) for `conn_str`, trusting `ca_pem`, redirected to
    `mqtt_port`. Defaults to connection_retry=False so that a dropped connection stays dropped
    (tests assert on that); pass connection_retry=True to override. Shut down at teardown."""
    from azure.iot.device import IoTHubDeviceClient

    return _make_client(IoTHubDeviceClient, conn_str, ca_pem, mqtt_port, **kwargs)


def make_module_client(conn_str: str, ca_pem: str, mqtt_port: int, **kwargs: Any):
    """An `IoTHubModuleClient` for a connection string with `ModuleId`, set up like
    `make_device_client`."""
    from azure.iot.device import IoTHubModuleClient

    return _make_client(IoTHubModuleClient, conn_str, ca_pem, mqtt_port, **kwargs)


def shutdown_client(client: Any) -> None:
    """Shut a device client down, ignoring errors (it may be already shut down or dropped)."""
    try:
        call_with_timeout(client.shutdown, timeout=15, what="client.shutdown")
    except BaseException:  # noqa: BLE001 - cleanup
        pass
    try:
        _device_clients.remove(client)
    except ValueError:
        pass


def shutdown_all_clients() -> None:
    for c in list(_device_clients):
        shutdown_client(c)


# --------------------------------------------------------------------------------------------
# Prometheus text


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$")
_LABEL_RE = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _unescape_label(v: str) -> str:
    out, i = [], 0
    while i < len(v):
        if v[i] == "\\" and i + 1 < len(v):
            out.append({"n": "\n", "\\": "\\", '"': '"'}.get(v[i + 1], v[i + 1]))
            i += 2
        else:
            out.append(v[i])
            i += 1
    return "".join(out)


def parse_prometheus(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text exposition → {(name, frozenset({(label, value), ...})): value}."""
    out: dict[tuple[str, frozenset], float] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if not m:
            raise ValueError(f"unparsable metrics line: {raw!r}")
        name, label_text, value = m.groups()
        labels = {}
        if label_text:
            for lm in _LABEL_RE.finditer(label_text):
                labels[lm.group(1)] = _unescape_label(lm.group(2))
        out[(name, frozenset(labels.items()))] = float(value)
    return out


def metric_sum_of(metrics: dict, name: str, **labels: str) -> float:
    """Sum of every sample called `name` whose labels include `labels` (e.g. over all shards)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in metrics.items() if n == name and want <= ls)




# --------------------------------------------------------------------------------------------
# Event records


def is_acked(info) -> bool:
    """Whether paho's message was acknowledged; False (not an exception) for one whose
    connection was already gone when it was published."""
    try:
        return info.is_published()
    except RuntimeError:
        return False


def record_body(record: dict) -> bytes:
    """The raw body of a consumer-API record."""
    enc = record.get("bodyEncoding")
    if enc == "base64":
        return base64.b64decode(record["body"])
    assert enc == "utf-8", f"unexpected bodyEncoding in {record!r}"
    return record["body"].encode("utf-8")


def record_device(record: dict) -> str | None:
    return record.get("systemProperties", {}).get("iothub-connection-device-id")


def telemetry_of(records: Iterable[dict], device_id: str) -> list[dict]:
    """The telemetry records of one device, in (partition, offset) order."""
    mine = [
        r for r in records
        if record_device(r) == device_id
        and r.get("systemProperties", {}).get("iothub-message-source") == "Telemetry"
    ]
    return sorted(mine, key=lambda r: (r["partition"], r["offset"]))


# --------------------------------------------------------------------------------------------
# Raw paho device (no SDK)


class RawMqttDevice:
    """A paho MQTT 3.1.1 client over TLS with a SAS token built here, with no automatic
    reconnect. Records CONNACK, disconnect and PUBACKs (by mid). `password` / `username` replace
    the valid token / username, `client_id` the device id as client id; send_password=False
    sends a CONNECT without a password."""

    def __init__(self, mqtt_port: int, ca_pem: str, device_id: str, key: str, *,
                 hostname: str = HUB_HOSTNAME, keepalive: int = 60, max_inflight: int = 20,
                 clean_session: bool = False, password: str | None = None,
                 username: str | None = None, send_password: bool = True, client_id: str | None = None):
        self.mqtt_port = mqtt_port
        self.hostname = hostname
        self.device_id = device_id
        self.keepalive = keepalive
        self.client = paho.Client(client_id=client_id or device_id, clean_session=clean_session,
                                  protocol=paho.MQTTv311, reconnect_on_failure=False)
        ctx = ssl.create_default_context(cafile=None, cadata=ca_pem)  # CERT_REQUIRED + hostname check
        self.client.tls_set_context(ctx)
        token = password if password is not None else device_sas_token(hostname, device_id, key)
        self.client.username_pw_set(username if username is not None else mqtt_username(hostname, device_id),
                                    token if send_password else None)
        self.client.max_inflight_messages_set(max_inflight)
        self.connack = threading.Event()
        self.connack_rc: int | None = None
        self.connack_flags: int | None = None
        self.disconnected = threading.Event()
        self.disconnect_rc: int | None = None
        self.acked_mids: list[int] = []  # list.append is atomic; no lock shared with paho
        self.loop_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    def _on_connect(self, client, userdata, flags, rc):
        self.connack_rc = rc
        # Bit 0 of CONNACK's flags: session-present.
        self.connack_flags = int(flags.get("session present", 0))
        self.connack.set()

    def _on_disconnect(self, client, userdata, rc):
        self.disconnect_rc = rc
        self.disconnected.set()

    def _on_publish(self, client, userdata, mid):
        self.acked_mids.append(mid)

    def _network_loop(self) -> None:
        # paho's own loop_start() thread dies without calling on_disconnect when a TLS send
        # meets a peer that vanished (ssl.SSLEOFError escapes paho 1.x), so the network loop
        # runs here and a loop that ends for any reason counts as a disconnect.
        try:
            self.client.loop_forever()
        except BaseException as exc:  # noqa: BLE001 - recorded for the test to inspect
            self.loop_error = exc
        finally:
            self.disconnected.set()

    def _start_loop(self) -> None:
        self._thread = threading.Thread(target=self._network_loop, name=f"mqtt-{self.device_id}", daemon=True)
        # paho 1.x writes a publish from the calling thread when it sees no loop thread of its
        # own, racing the loop's TLS reads on the same SSL object (OpenSSL allows one thread at
        # a time): packets then vanish now and then. Told about this thread, paho queues the
        # packet and the loop thread writes it.
        self.client._thread = self._thread
        self._thread.start()

    def connect(self, timeout: float = 20.0) -> None:
        """TCP+TLS connect (synchronous in paho), start the network thread, wait for CONNACK 0."""
        self.client.connect(self.hostname, self.mqtt_port, keepalive=self.keepalive)
        self._start_loop()
        assert self.connack.wait(timeout), f"no CONNACK within {timeout}s"
        assert self.connack_rc == 0, f"CONNACK refused: rc={self.connack_rc}"

    def connect_refused(self, timeout: float = 20.0) -> int:
        """Connect expecting a refusing CONNACK; returns its return code (Python's SDK maps 4 and 5
        to CredentialError)."""
        self.client.connect(self.hostname, self.mqtt_port, keepalive=self.keepalive)
        self._start_loop()
        assert self.connack.wait(timeout), f"no CONNACK within {timeout}s"
        assert self.connack_rc != 0, "CONNACK accepted, expected a refusal"
        return self.connack_rc

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> paho.MQTTMessageInfo:
        """Publishes; a connection the hub has closed meanwhile gives a message that is never
        acknowledged (paho writes from the calling thread and may raise instead of reporting)."""
        try:
            info = self.client.publish(topic, payload, qos=qos)
        except (ssl.SSLError, OSError):
            info = paho.MQTTMessageInfo(-1)
            info.rc = paho.MQTT_ERR_NO_CONN
            return info
        assert info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN), f"publish rc={info.rc}"
        return info

    def wait_disconnected(self, timeout: float = 10.0) -> int | None:
        assert self.disconnected.wait(timeout), f"connection not closed by the hub within {timeout}s"
        return self.disconnect_rc

    @property
    def connected(self) -> bool:
        return self.connack_rc == 0 and not self.disconnected.is_set()

    def subscribe_collect(self, topic_filter: str, qos: int = 1, timeout: float = 10.0) -> queue.Queue:
        """SUBSCRIBE to `topic_filter` and wait for its SUBACK (granted); returns a queue that
        gets (topic, payload) of every message the hub sends on it."""
        got: queue.Queue = queue.Queue()
        subacked = threading.Event()
        granted: list = []

        def on_subscribe(client, userdata, mid, qos_list):
            granted.extend(qos_list)
            subacked.set()

        self.client.on_subscribe = on_subscribe
        self.client.message_callback_add(topic_filter, lambda c, u, m: got.put((m.topic, m.payload)))
        rc, _ = self.client.subscribe(topic_filter, qos=qos)
        assert rc == paho.MQTT_ERR_SUCCESS, f"subscribe rc={rc}"
        assert subacked.wait(timeout), f"no SUBACK for {topic_filter} within {timeout}s"
        assert granted and granted[0] != 0x80, f"SUBSCRIBE {topic_filter} refused: {granted}"
        return got

    def close(self) -> None:
        try:
            self.client.disconnect()
        except Exception:  # noqa: BLE001 - cleanup
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)


# --------------------------------------------------------------------------------------------
# The hub: control and engine as separate processes sharing one data dir


class Hub:
    """A roost control plane and engine on free ports with their own data dir under `root`.

    Attributes: data_dir, ports (dict: service, control_ops, link, mqtt, ops), control_log,
    engine_log, cli_log, control / engine (Popen or None)."""

    def __init__(self, root: Path, binary: Path, cores: int = ENGINE_CORES, hostname: str = HUB_HOSTNAME):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.root / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.binary = Path(binary)
        self.cores = cores
        self.hostname = hostname
        self.ports = {name: free_port() for name in ("service", "control_ops", "link", "mqtt", "ops", "amqp", "https",
                                                        "dps_https", "dps_mqtt", "dps_amqp", "blob")}
        self.control_log = self.root / "control.log"
        self.engine_log = self.root / "engine.log"
        self.cli_log = self.root / "cli.log"
        self.control: subprocess.Popen | None = None
        self.engine: subprocess.Popen | None = None
        self._info: dict | None = None
        self._ca_pem: str | None = None
        self.start_error: BaseException | None = None
        self._raw: list[RawMqttDevice] = []
        # Extra `roost engine` arguments (limits a test sets low), used by start_engine.
        self.engine_args: list[str] = []
        # Extra `roost control` arguments (quotas a test sets), used by start_control.
        self.control_args: list[str] = []
        # Where file uploads go: None is the embedded blob store on ports["blob"].
        self.blob_args: list[str] | None = None
        # When set, the engine's database folder is a tmpfs of this many MiB, mounted in a mount
        # namespace of the engine's own (a disk that can be filled; see engine_root()).
        self.engine_tmpfs_mib: int | None = None

    # ---- logs
    def log_files(self) -> list[tuple[str, Path]]:
        return [("control", self.control_log), ("engine", self.engine_log), ("cli", self.cli_log)]

    def log_tails(self, lines: int = 60) -> str:
        return "\n".join(f"----- {label} ({path}) -----\n{tail_file(path, lines)}" for label, path in self.log_files())

    # ---- addresses
    @property
    def mqtt_port(self) -> int:
        return self.ports["mqtt"]

    @property
    def ops_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['ops']}"

    @property
    def control_ops_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['control_ops']}"

    @property
    def info(self) -> dict:
        """D/hub.json as read after start-up."""
        if self._info is None:
            self._info = read_hub_json(self.data_dir)
        return self._info

    @property
    def service_url(self) -> str:
        return self.info["service_url"]

    @property
    def dps(self) -> dict:
        """hub.json's `dps`: the provisioning service's hostname, id_scope,
        service_connection_string and ports."""
        return read_hub_json(self.data_dir)["dps"]

    @property
    def service_connection_string(self) -> str:
        return self.info["service_connection_string"]

    @property
    def owner_key(self) -> str:
        return parse_connection_string(self.service_connection_string)["SharedAccessKey"]

    @property
    def ca_path(self) -> str:
        return self.info["ca"]

    @property
    def ca_pem(self) -> str:
        if self._ca_pem is None:
            self._ca_pem = Path(self.ca_path).read_text()
        return self._ca_pem

    # ---- processes
    def _wait_healthy(self, proc: subprocess.Popen, url: str, name: str, log: Path) -> None:
        def ready() -> bool:
            if proc.poll() is not None:
                raise _ProcessExited(proc.returncode)
            return http_ok(url)

        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                if ready():
                    return
            except _ProcessExited as e:
                raise AssertionError(f"{name} exited with {e.rc} before {url} answered 200\n{tail_file(log)}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"{name} not healthy ({url}) within {READY_TIMEOUT:.0f}s\n{tail_file(log)}")
            time.sleep(0.1)

    def start(self) -> "Hub":
        """Start control, then the engine, and wait until hub.json carries the engine's ports."""
        self.start_control()
        self.start_engine()

        def merged() -> bool:
            info = read_hub_json(self.data_dir)
            return info.get("ports", {}).get("mqtt") == self.mqtt_port and "service_connection_string" in info

        wait_until(merged, READY_TIMEOUT, f"{self.data_dir}/hub.json with ports.mqtt={self.mqtt_port}")
        self._info = read_hub_json(self.data_dir)
        return self

    def start_control(self) -> None:
        assert self.control is None or self.control.poll() is not None, "control already running"
        p = self.ports
        self.control = spawn(self.binary, [
            "control", "--data-dir", str(self.data_dir),
            "--hostname", self.hostname,
            "--service", f"127.0.0.1:{p['service']}",
            "--ops", f"127.0.0.1:{p['control_ops']}",
            "--link", f"127.0.0.1:{p['link']}",
            "--dps-https", f"127.0.0.1:{p['dps_https']}",
            "--dps-mqtt", f"127.0.0.1:{p['dps_mqtt']}",
            "--dps-amqp", f"127.0.0.1:{p['dps_amqp']}",
            *(self.blob_args if self.blob_args is not None else ["--blob", f"127.0.0.1:{p['blob']}"]),
            *self.control_args,
        ], self.control_log)
        self._wait_healthy(self.control, f"{self.control_ops_url}/healthz", "roost control", self.control_log)

    def start_engine(self) -> None:
        assert self.engine is None or self.engine.poll() is not None, "engine already running"
        p = self.ports
        args = [
            "engine", "--data-dir", str(self.data_dir),
            "--control", f"127.0.0.1:{p['link']}",
            "--mqtt", f"127.0.0.1:{p['mqtt']}",
            "--ops", f"127.0.0.1:{p['ops']}",
            "--amqp", f"127.0.0.1:{p['amqp']}",
            "--https", f"127.0.0.1:{p['https']}",
            "--cores", str(self.cores),
            *self.engine_args,
        ]
        if self.engine_tmpfs_mib is None:
            self.engine = spawn(self.binary, args, self.engine_log)
        else:
            # unshare execs sh, which mounts and execs roost: the engine keeps this pid.
            engine_dir = self.data_dir / "engine"
            engine_dir.mkdir(exist_ok=True)
            user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
            script = f'mount -t tmpfs -o size={self.engine_tmpfs_mib}m roost-test "{engine_dir}" && exec "$0" "$@"'
            self.engine = spawn(Path("unshare"), [*user, "--mount", "--propagation", "private", "--",
                                                  "sh", "-c", script, str(self.binary), *args], self.engine_log)
        self._wait_healthy(self.engine, f"{self.ops_url}/healthz", "roost engine", self.engine_log)

    def engine_root(self) -> Path:
        """The engine's data folder as the engine sees it (through its mount namespace)."""
        assert self.engine is not None
        return Path(f"/proc/{self.engine.pid}/root") / str(self.data_dir / "engine").lstrip("/")

    def stop_control(self) -> int:
        """SIGTERM control and wait for it to exit (fails if it does not)."""
        assert self.control is not None
        return stop_process(self.control, signal.SIGTERM)

    def kill_control(self) -> None:
        kill_process_group(self.control)

    def stop_engine(self) -> int:
        assert self.engine is not None
        return stop_process(self.engine, signal.SIGTERM)

    def kill_engine(self) -> None:
        """SIGKILL the engine (kill -9) and reap it."""
        assert self.engine is not None
        kill_process_group(self.engine)
        assert self.engine.poll() is not None

    def close(self) -> None:
        for raw in self._raw:
            raw.close()
        self._raw.clear()
        kill_process_group(self.engine)
        kill_process_group(self.control)

    # ---- CLI
    def cli(self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        """`roost <args...> --data-dir D`."""
        return run_cli(self.binary, [*args, "--data-dir", str(self.data_dir)], self.cli_log, timeout, check)

    def create_device(self, device_id: str) -> str:
        """`roost device create ID`; returns the device connection string it prints."""
        return create_device_via_cli(self.binary, self.data_dir, device_id, self.cli_log)

    def show_device(self, device_id: str) -> dict:
        return json.loads(self.cli("device", "show", device_id).stdout)

    def list_devices(self) -> list:
        return json.loads(self.cli("device", "list").stdout)

    def delete_device(self, device_id: str) -> None:
        self.cli("device", "delete", device_id)

    def tail_events(self, *extra: str) -> list[dict]:
        """`roost events tail --json ...` → the JSON records it prints."""
        return tail_events_via_cli(self.binary, self.data_dir, list(extra), self.cli_log)

    # ---- service API
    def registry_manager(self):
        """`IoTHubRegistryManager` pointed at this hub's service API (wire spec §9)."""
        return make_registry_manager(self.service_connection_string, self.service_url, self.ca_path)

    def configuration_manager(self):
        """`IoTHubConfigurationManager` pointed at this hub's service API."""
        return make_configuration_manager(self.service_connection_string, self.service_url, self.ca_path)

    def job_manager(self):
        """`IoTHubJobManager` pointed at this hub's service API."""
        return make_job_manager(self.service_connection_string, self.service_url, self.ca_path)

    def connection_state(self, rm, device_id: str) -> str | None:
        return rm.get_device(device_id).connection_state

    def wait_connection_state(self, rm, device_id: str, state: str, timeout: float = STATE_TIMEOUT) -> None:
        wait_until(lambda: self.connection_state(rm, device_id) == state, timeout,
                   f"connectionState of {device_id} == {state}", interval=0.2)

    def service_headers(self, token: str | None = None) -> dict[str, str]:
        token = token or service_sas_token(self.hostname, "iothubowner", self.owner_key)
        return {"Authorization": token, "Content-Type": "application/json; charset=utf-8",
                "Accept": "application/json"}

    # ---- ops API: events
    @property
    def ops_headers(self) -> dict[str, str]:
        """The ops ports' credential (hub.json's ops_token)."""
        return {"Authorization": f"Bearer {self.info['ops_token']}"}

    def ops_get(self, path: str, **params: Any) -> Any:
        r = requests.get(self.ops_url + path, params=params, headers=self.ops_headers, timeout=10)
        assert r.status_code == 200, f"GET {path} {params} -> {r.status_code} {r.text[:500]}"
        return r.json()

    def partitions(self) -> list[dict]:
        return self.ops_get("/events/partitions")["partitions"]

    def partition_records(self, partition: int, from_: int, max_: int = 1000) -> dict:
        return self.ops_get(f"/events/partitions/{partition}/records", **{"from": from_, "max": max_})

    def records(self, page: int = 1000) -> list[dict]:
        """Every record currently in every partition (paged), in (partition, offset) order."""
        out: list[dict] = []
        for part in self.partitions():
            p, pos, end = part["partition"], part["first"], part["next"]
            while pos < end:
                res = self.partition_records(p, pos, page)
                batch = res["records"]
                out.extend(batch)
                # A page may be empty and still move on: records routed elsewhere are skipped.
                if res["next"] <= pos:
                    assert not batch, f"partition {p}: next {res['next']} did not advance past {pos}"
                    break
                pos = res["next"]
        return out

    def group_records(self, group: str, max_: int = 1000, from_: str = "earliest") -> dict:
        return self.ops_get(f"/events/groups/{group}/records", **{"max": max_, "from": from_})

    def checkpoint(self, group: str, positions: dict) -> None:
        r = requests.post(f"{self.ops_url}/events/groups/{group}/checkpoint", json=positions,
                          headers=self.ops_headers, timeout=10)
        assert r.status_code == 204, f"checkpoint -> {r.status_code} {r.text[:500]}"

    # ---- ops API: metrics
    def metrics(self) -> dict[tuple[str, frozenset], float]:
        r = requests.get(f"{self.ops_url}/metrics", headers=self.ops_headers, timeout=10)
        assert r.status_code == 200, f"GET /metrics -> {r.status_code}"
        return parse_prometheus(r.text)

    def control_metrics(self) -> dict[tuple[str, frozenset], float]:
        r = requests.get(f"{self.control_ops_url}/metrics", headers=self.ops_headers, timeout=10)
        assert r.status_code == 200, f"GET control /metrics -> {r.status_code}"
        return parse_prometheus(r.text)

    def metric_sum(self, name: str, **labels: str) -> float:
        """Current value of `name` summed over shards (and any label not given)."""
        return metric_sum_of(self.metrics(), name, **labels)

    def wait_metric(self, name: str, predicate: Callable[[float], bool], what: str,
                    timeout: float = METRIC_TIMEOUT, **labels: str) -> float:
        """Poll until predicate(metric_sum(name, **labels)) holds; returns the value."""
        seen: list[float] = []

        def check() -> bool:
            v = self.metric_sum(name, **labels)
            seen.append(v)
            return predicate(v)

        try:
            wait_until(check, timeout, f"{name}{labels or ''} {what}", interval=0.1)
        except AssertionError as e:
            raise AssertionError(f"{e}; last value {seen[-1] if seen else None}") from None
        return seen[-1]

    # ---- devices
    def device_client(self, conn_str: str, **kwargs: Any):
        """A device client redirected to this hub; `websockets=True` takes MQTT over WebSockets
        on the hub's port 443 listener."""
        return make_device_client(conn_str, self.ca_pem, self.mqtt_port,
                                  https_port=self.ports.get("https"), **kwargs)

    def connected_client(self, conn_str: str, timeout: float = STATE_TIMEOUT, **kwargs: Any):
        """A connected SDK client. A device just created reaches the engine's registry replica
        asynchronously, so a CredentialError is retried (fresh client) until `timeout`."""
        from azure.iot.device.exceptions import CredentialError

        deadline = time.monotonic() + timeout
        while True:
            client = self.device_client(conn_str, **kwargs)
            try:
                call_with_timeout(client.connect, what="connect")
                return client
            except CredentialError:
                shutdown_client(client)
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def assert_refused(self, conn_str: str, timeout: float = 0.0, **kwargs: Any) -> None:
        """The SDK's connect() raises CredentialError for `conn_str`. With a timeout, accepted
        attempts (registry change not yet at the engine) are shut down and retried until then."""
        from azure.iot.device.exceptions import CredentialError

        deadline = time.monotonic() + timeout
        while True:
            client = self.device_client(conn_str, **kwargs)
            try:
                call_with_timeout(client.connect, what="connect (expected refusal)")
            except CredentialError:
                return
            finally:
                shutdown_client(client)
            if time.monotonic() >= deadline:
                raise AssertionError(f"connect() was accepted, expected CredentialError "
                                     f"(waited {timeout:.0f}s): {parse_connection_string(conn_str).get('DeviceId')}")
            time.sleep(0.2)

    def raw_device(self, device_id: str, key: str, **kwargs: Any) -> RawMqttDevice:
        dev = RawMqttDevice(self.mqtt_port, self.ca_pem, device_id, key, hostname=self.hostname, **kwargs)
        self._raw.append(dev)
        return dev

    def raw_connected_device(self, device_id: str, key: str, timeout: float = STATE_TIMEOUT,
                             **kwargs: Any) -> RawMqttDevice:
        """A connected RawMqttDevice; a refused CONNACK (device not yet at the engine) is retried
        with a fresh client until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            dev = self.raw_device(device_id, key, **kwargs)
            try:
                dev.connect()
                return dev
            except AssertionError:
                dev.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def new_raw_device(self, prefix: str, **kwargs: Any) -> tuple[RawMqttDevice, str, str]:
        """Create a device with the CLI and connect it with raw paho: (device, id, key)."""
        device_id = unique_id(prefix)
        key = parse_connection_string(self.create_device(device_id))["SharedAccessKey"]
        return self.raw_connected_device(device_id, key, **kwargs), device_id, key

    def tls_socket(self, timeout: float = 10.0) -> ssl.SSLSocket:
        """A raw TLS connection to the MQTT port, verifying the hub certificate for `localhost`."""
        ctx = ssl.create_default_context(cadata=self.ca_pem)
        sock = socket.create_connection(("127.0.0.1", self.mqtt_port), timeout=timeout)
        return ctx.wrap_socket(sock, server_hostname=self.hostname)


class _ProcessExited(Exception):
    def __init__(self, rc: int | None):
        super().__init__(rc)
        self.rc = rc


def create_device_via_cli(binary: Path, data_dir: Path, device_id: str, log: Path) -> str:
    """`roost device create ID --data-dir D` must print exactly one line: the connection string."""
    cp = run_cli(binary, ["device", "create", device_id, "--data-dir", str(data_dir)], log)
    lines = [ln for ln in cp.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"`roost device create` printed {len(lines)} lines: {cp.stdout!r}"
    cs = lines[0].strip()
    fields = parse_connection_string(cs)
    assert fields.get("DeviceId") == device_id, cs
    assert fields.get("HostName"), cs
    base64.b64decode(fields["SharedAccessKey"], validate=True)
    return cs


def tail_events_via_cli(binary: Path, data_dir: Path, extra: list[str], log: Path) -> list[dict]:
    cp = run_cli(binary, ["events", "tail", "--data-dir", str(data_dir), "--json", *extra], log)
    lines = [ln for ln in cp.stdout.splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines]


def _pointed_at_hub(client, service_url: str, ca_path: str):
    """A service SDK client (its msrest `protocol`) sent to this hub's service API."""
    client.protocol.config.base_url = service_url
    client.protocol.config.connection.verify = str(ca_path)
    client.protocol.config.connection.timeout = 15
    client.protocol.config.retry_policy.retries = 0
    return client


def make_registry_manager(service_connection_string: str, service_url: str, ca_path: str):
    from azure.iot.hub import IoTHubRegistryManager

    rm = IoTHubRegistryManager.from_connection_string(service_connection_string)
    return _pointed_at_hub(rm, service_url, ca_path)


def make_configuration_manager(service_connection_string: str, service_url: str, ca_path: str):
    from azure.iot.hub import IoTHubConfigurationManager

    cm = IoTHubConfigurationManager.from_connection_string(service_connection_string)
    return _pointed_at_hub(cm, service_url, ca_path)


def make_job_manager(service_connection_string: str, service_url: str, ca_path: str):
    from azure.iot.hub import IoTHubJobManager

    jm = IoTHubJobManager.from_connection_string(service_connection_string)
    return _pointed_at_hub(jm, service_url, ca_path)


# --------------------------------------------------------------------------------------------
# pytest wiring


def register_logs(node: pytest.Item, files: Iterable[tuple[str, Path]]) -> None:
    """Attach log files to a test item; their tails are added to its report if it fails."""
    logs = getattr(node, "roost_logs", None)
    if logs is None:
        logs = []
        node.roost_logs = logs
    logs.extend(files)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for label, path in getattr(item, "roost_logs", []):
            report.sections.append((f"roost log: {label} ({path})", tail_file(path, 80)))


def _executable(path: Path, what: str, how: str) -> Path:
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{what} not found at {path}: {how}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def roost_binary() -> Path:
    return _executable(roost_bin(), "roost binary",
                       "run `cargo build` first, or set ROOST_BIN / CARGO_TARGET_DIR")


@pytest.fixture(scope="session")
def bench_binary() -> Path:
    return _executable(bench_bin(), "roost-bench",
                       "run `cargo build --bin roost-bench` first, or set BENCH_BIN")


@pytest.fixture
def hub_factory(roost_binary: Path, tmp_path: Path, request: pytest.FixtureRequest):
    """make(start=True) -> Hub: fresh hubs for this test; all killed at teardown."""
    hubs: list[Hub] = []

    def make(start: bool = True) -> Hub:
        h = Hub(tmp_path / f"hub{len(hubs)}", roost_binary)
        hubs.append(h)
        register_logs(request.node, h.log_files())
        if start:
            h.start()
        return h

    yield make
    shutdown_all_clients()
    for h in hubs:
        h.close()


@pytest.fixture
def hub(hub_factory) -> Hub:
    """A started hub (control + engine with 2 cores) for this test alone."""
    return hub_factory()


@pytest.fixture(scope="module")
def _module_hub(roost_binary: Path, tmp_path_factory: pytest.TempPathFactory):
    h = Hub(tmp_path_factory.mktemp("hub"), roost_binary)
    try:
        h.start()
    except BaseException as e:  # noqa: BLE001 - reported by shared_hub with the logs attached
        h.start_error = e
    yield h
    h.close()


@pytest.fixture
def shared_hub(_module_hub: Hub, request: pytest.FixtureRequest) -> Hub:
    """A hub shared by the tests of one module (faster); tests must use metric deltas and
    unique device ids. Device clients are shut down after each test."""
    register_logs(request.node, _module_hub.log_files())
    if _module_hub.start_error is not None:
        pytest.fail(f"shared hub failed to start: {_module_hub.start_error}", pytrace=False)
    yield _module_hub
    shutdown_all_clients()
    for raw in _module_hub._raw:
        raw.close()
    _module_hub._raw.clear()
