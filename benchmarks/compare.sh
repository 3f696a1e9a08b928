#!/usr/bin/env bash
# Peer comparison (issue 3): the same four scenarios against roost, mosquitto and rumqttd, one
# after another on this machine, each on a freshly started server; the table, with versions,
# machine and the exact commands, goes into docs/benchmarks.md between
# <!-- compare:begin --> and <!-- compare:end -->.
#
#   (a) one pipelined publisher, QoS 0, 100 B, flat out
#   (b) 1,000 devices at a fixed total rate, QoS 1
#   (c) 50,000 idle TLS connections: server RSS per connection
#   (d) TLS connect rate (connect + CONNACK + DISCONNECT loops)
#   (h) the (b) fleet at half of each broker's own maximum: a flat-out run first (H_MAX_SECS)
#       finds the QoS 1 rate it acknowledges, then the measured run goes at half of that
#
# Usage: benchmarks/compare.sh            full run (about 3 minutes of measurement plus set-up)
#        QUICK=1 benchmarks/compare.sh    smoke run with small sizes (under 2 minutes)
#
# Overrides (environment): BROKERS="roost mosquitto rumqttd", SCENARIOS="a b c d h", PAYLOAD,
# A_SECS, B_SECS, H_MAX_SECS, B_DEVICES, B_RATE, B_INFLIGHT, IDLE, HOLD, D_SECS, D_LOOPS, WARMUP, DRAIN, MAX_DRAIN,
# THREADS, PORT_BASE, DOC (the Markdown file to update), ROOST_BIN / BENCH_BIN (use these
# binaries and skip the build), KEEP_WORK=1 (keep the work directory), ROOST_ROUTES (a
# routes.lua to apply to roost after it starts; plugins from ROOST_PLUGINS, default plugins/).
#
# Everything listens on 127.0.0.1 only. Every server this script starts is stopped on exit.

set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
QUICK=${QUICK:-0}

if [[ $QUICK == 1 ]]; then
  d_a=3 d_b=3 d_hmax=3 d_devices=100 d_rate=2000 d_idle=500 d_hold=2 d_d=3 d_loops=4 d_warmup=1 d_drain=3 d_max_drain=20
else
  d_a=20 d_b=20 d_hmax=10 d_devices=1000 d_rate=20000 d_idle=50000 d_hold=10 d_d=15 d_loops=8 d_warmup=2 d_drain=10 d_max_drain=120
fi
BROKERS=${BROKERS:-roost mosquitto rumqttd}
SCENARIOS=${SCENARIOS:-a b c d h}
PAYLOAD=${PAYLOAD:-100}
A_SECS=${A_SECS:-$d_a}
B_SECS=${B_SECS:-$d_b}
H_MAX_SECS=${H_MAX_SECS:-$d_hmax}
B_DEVICES=${B_DEVICES:-$d_devices}
B_RATE=${B_RATE:-$d_rate}
B_INFLIGHT=${B_INFLIGHT:-100}
IDLE=${IDLE:-$d_idle}
HOLD=${HOLD:-$d_hold}
D_SECS=${D_SECS:-$d_d}
D_LOOPS=${D_LOOPS:-$d_loops}
WARMUP=${WARMUP:-$d_warmup}
DRAIN=${DRAIN:-$d_drain}
MAX_DRAIN=${MAX_DRAIN:-$d_max_drain}
THREADS=${THREADS:-}
PORT_BASE=${PORT_BASE:-21000}
DOC=${DOC:-$REPO/docs/benchmarks.md}
RUMQTTD_VERSION=0.20.0

WORK=$(mktemp -d /tmp/roost-compare.XXXXXX)
chmod 0755 "$WORK" # the brokers' own users (mosquitto drops root) read their certificates here
RESULTS=$WORK/results
mkdir -p "$RESULTS"
NOTES=$WORK/notes.txt
COMMANDS=$WORK/commands.txt
: >"$NOTES"
: >"$COMMANDS"

log() { printf '[compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
note() { printf '%s\n' "$*" >>"$NOTES"; log "note: $*"; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Servers: every pid started is recorded and stopped on exit.

SERVER_PIDS=()

stop_pid() {
  local pid=$1
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

stop_servers() {
  # Newest first: `roost up` is stopped before the engine and control it started (it stops
  # them itself; they are in the list too in case it could not).
  local i
  for ((i = ${#SERVER_PIDS[@]} - 1; i >= 0; i--)); do
    stop_pid "${SERVER_PIDS[$i]}"
  done
  SERVER_PIDS=()
}

BENCH_PID=

cleanup() {
  local rc=$?
  [[ -n $BENCH_PID ]] && stop_pid "$BENCH_PID"
  stop_servers
  if [[ ${KEEP_WORK:-0} == 1 || $rc != 0 ]]; then
    log "work directory kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() { # port timeout_s pid
  local port=$1 deadline=$((SECONDS + $2)) pid=$3
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || return 1
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

# Ports: roost +1 TLS MQTT, +2 plain MQTT, +3 service, +4 ops, +5 control ops, +6 link;
# mosquitto +11 plain, +12 TLS; rumqttd +21 plain, +22 TLS.
P_ROOST_TLS=$((PORT_BASE + 1)) P_ROOST_PLAIN=$((PORT_BASE + 2))
P_MOSQ=$((PORT_BASE + 11)) P_MOSQ_TLS=$((PORT_BASE + 12))
P_RUMQ=$((PORT_BASE + 21)) P_RUMQ_TLS=$((PORT_BASE + 22))

SERVER_PID=   # the process to measure (roost: the engine)
ROOST_DATA=

start_roost() { # name
  ROOST_DATA=$WORK/roost-$1
  rm -rf "$ROOST_DATA"
  local cmd=("$ROOST_BIN" up --data-dir "$ROOST_DATA" --mqtt "127.0.0.1:$P_ROOST_TLS" --plain-mqtt "127.0.0.1:$P_ROOST_PLAIN"
    --service "127.0.0.1:$((PORT_BASE + 3))" --ops "127.0.0.1:$((PORT_BASE + 4))" --control-ops "127.0.0.1:$((PORT_BASE + 5))"
    --link "127.0.0.1:$((PORT_BASE + 6))")
  echo "${cmd[*]}" >"$WORK/roost.cmd"
  "${cmd[@]}" >"$WORK/roost-$1.log" 2>&1 &
  local up=$!
  SERVER_PIDS+=("$up")
  local deadline=$((SECONDS + 120))
  until grep -q '^roost is up' "$WORK/roost-$1.log"; do
    kill -0 "$up" 2>/dev/null || { tail -20 "$WORK/roost-$1.log" >&2; die "roost up exited during start-up"; }
    ((SECONDS < deadline)) || die "roost did not come up within 120 s (log: $WORK/roost-$1.log)"
    sleep 0.1
  done
  SERVER_PID=$(pgrep -P "$up" -f ' engine ' | head -1)
  local control
  control=$(pgrep -P "$up" -f ' control ' | head -1)
  [[ -n $SERVER_PID && -n $control ]] || die "cannot find roost's engine and control processes"
  SERVER_PIDS+=("$control" "$SERVER_PID")
  if [[ -n ${ROOST_ROUTES:-} ]]; then
    "$ROOST_BIN" routes apply "$ROOST_ROUTES" --plugins "${ROOST_PLUGINS:-$REPO/plugins}" --data-dir "$ROOST_DATA" \
      >>"$WORK/roost-$1.log" 2>&1 || die "roost routes apply $ROOST_ROUTES failed (log: $WORK/roost-$1.log)"
    note "roost routing: $ROOST_ROUTES applied"
  fi
}

make_certs() {
  # TLS for the peers uses the certificates roost generates (a CA and a localhost server cert),
  # copied where the brokers' own users can read them.
  [[ -f $WORK/certs/server.pem ]] && return 0
  if [[ -z ${ROOST_DATA:-} || ! -f $ROOST_DATA/certs/server.pem ]]; then
    start_roost certs
    stop_servers
  fi
  mkdir -p "$WORK/certs"
  cp "$ROOST_DATA/certs/ca.pem" "$ROOST_DATA/certs/server.pem" "$ROOST_DATA/certs/server.key" "$WORK/certs/"
  chmod 0644 "$WORK/certs/"*.pem
  if id mosquitto >/dev/null 2>&1; then
    chown mosquitto "$WORK/certs" "$WORK/certs/"*
    chmod 0600 "$WORK/certs/server.key"
  else
    chmod 0644 "$WORK/certs/server.key"
  fi
}

start_mosquitto() { # name
  make_certs
  cat >"$WORK/mosquitto.conf" <<EOF
# roost compare.sh: loopback only, anonymous, nothing persisted, queues raised so nothing is
# dropped for a slow subscriber, Nagle off (its default is on, which adds 40 ms to TLS set-up).
per_listener_settings false
allow_anonymous true
persistence false
set_tcp_nodelay true
max_inflight_messages 1000
max_queued_messages 10000000
log_dest stderr
log_type error
log_type warning
listener $P_MOSQ 127.0.0.1
listener $P_MOSQ_TLS 127.0.0.1
cafile $WORK/certs/ca.pem
certfile $WORK/certs/server.pem
keyfile $WORK/certs/server.key
EOF
  mosquitto -c "$WORK/mosquitto.conf" >"$WORK/mosquitto-$1.log" 2>&1 &
  SERVER_PID=$!
  SERVER_PIDS+=("$SERVER_PID")
  if ! { wait_port "$P_MOSQ" 30 "$SERVER_PID" && wait_port "$P_MOSQ_TLS" 30 "$SERVER_PID"; }; then
    cat "$WORK/mosquitto-$1.log" >&2
    die "mosquitto did not start"
  fi
}

start_rumqttd() { # name
  make_certs
  local max_conn=$((IDLE + D_LOOPS + 1000)) payload=$((PAYLOAD + 1024))
  ((payload < 20480)) && payload=20480
  cat >"$WORK/rumqttd.toml" <<EOF
# roost compare.sh: rumqttd $RUMQTTD_VERSION, loopback only; router values from rumqttd's sample
# config except max_connections; no console, no prometheus.
id = 0

[router]
id = 0
max_connections = $max_conn
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:$P_RUMQ"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = $payload
    max_inflight_count = 1000
    dynamic_filters = true

[v4.2]
name = "v4-2"
listen = "127.0.0.1:$P_RUMQ_TLS"
next_connection_delay_ms = 0
    [v4.2.tls]
    certpath = "$WORK/certs/server.pem"
    keypath = "$WORK/certs/server.key"
    [v4.2.connections]
    connection_timeout_ms = 60000
    max_payload_size = $payload
    max_inflight_count = 1000
    dynamic_filters = true
EOF
  rumqttd -c "$WORK/rumqttd.toml" >"$WORK/rumqttd-$1.log" 2>&1 &
  SERVER_PID=$!
  SERVER_PIDS+=("$SERVER_PID")
  if ! { wait_port "$P_RUMQ" 30 "$SERVER_PID" && wait_port "$P_RUMQ_TLS" 30 "$SERVER_PID"; }; then
    tail -30 "$WORK/rumqttd-$1.log" >&2
    die "rumqttd did not start"
  fi
}

# ---------------------------------------------------------------------------------------------
# One measurement: the scenario's arguments for the broker, run, keep the JSON line.

target_args() { # broker tls(0|1)
  case $1 in
    roost) echo "--target roost --hub $ROOST_DATA$([[ $2 == 1 ]] && echo ' --tls')" ;;
    mosquitto) [[ $2 == 1 ]] && echo "--target mqtt --addr 127.0.0.1:$P_MOSQ_TLS --tls --ca $WORK/certs/ca.pem --server-name localhost" ||
      echo "--target mqtt --addr 127.0.0.1:$P_MOSQ" ;;
    rumqttd) [[ $2 == 1 ]] && echo "--target mqtt --addr 127.0.0.1:$P_RUMQ_TLS --tls --ca $WORK/certs/ca.pem --server-name localhost" ||
      echo "--target mqtt --addr 127.0.0.1:$P_RUMQ" ;;
  esac
}

scenario_args() { # scenario
  case $1 in
    a) echo "--connections 1 --qos 0 --payload $PAYLOAD --rate 0 --duration $A_SECS --warmup $WARMUP --drain-timeout $DRAIN --max-drain $MAX_DRAIN" ;;
    b) echo "--connections $B_DEVICES --qos 1 --inflight $B_INFLIGHT --payload $PAYLOAD --rate $B_RATE --duration $B_SECS --warmup $WARMUP --drain-timeout $DRAIN --max-drain $MAX_DRAIN" ;;
    c) echo "--idle --connections $IDLE --hold $HOLD" ;;
    h) echo "--connections $B_DEVICES --qos 1 --inflight $B_INFLIGHT --payload $PAYLOAD --warmup $WARMUP" ;; # + rate, duration: see measure
    d) echo "--connect-rate --connections $D_LOOPS --duration $D_SECS" ;;
  esac
}

start_server() { # scenario broker
  case $2 in
    roost) start_roost "$1" ;;
    mosquitto) start_mosquitto "$1" ;;
    rumqttd) start_rumqttd "$1" ;;
  esac
}

run_bench() { # scenario broker name [extra roost-bench arguments...]: results in $RESULTS/<name>-<broker>.*
  local sc=$1 broker=$2 name=$3 tls=0
  shift 3
  [[ $sc == c || $sc == d ]] && tls=1
  local targs sargs
  read -ra targs <<<"$(target_args "$broker" "$tls")"
  read -ra sargs <<<"$(scenario_args "$sc")"
  local args=("${targs[@]}" "${sargs[@]}" "$@" --server-pid "$SERVER_PID" --json --label "$name/$broker")
  [[ -n $THREADS ]] && args+=(--threads "$THREADS")
  printf '%s\n' "[$name/$broker] $(basename "$BENCH_BIN") ${args[*]}" | sed "s|$WORK|\$WORK|g" >>"$COMMANDS"
  log "($name) $broker: roost-bench ${args[*]}"
  local rc=0
  # In the background and waited for, so an interrupt reaches the trap at once.
  "$BENCH_BIN" "${args[@]}" >"$RESULTS/$name-$broker.json" 2>"$RESULTS/$name-$broker.log" &
  BENCH_PID=$!
  wait "$BENCH_PID" || rc=$?
  BENCH_PID=
  echo "$rc" >"$RESULTS/$name-$broker.rc"
  if [[ $rc != 0 ]]; then
    note "($name) $broker: roost-bench exited $rc: $(grep '^roost-bench:' "$RESULTS/$name-$broker.log" | tail -1)"
  fi
  grep -h 'fell behind' "$RESULTS/$name-$broker.log" | sed "s/^/($name) $broker: /" >>"$NOTES" || true
  return "$rc"
}

json_field() { # file field: a number from roost-bench's JSON line, or nothing
  python3 -c 'import json,sys; v=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]).get(sys.argv[2]); print("" if v is None else int(v))' "$1" "$2" 2>/dev/null || true
}

measure() { # scenario broker
  local sc=$1 broker=$2
  if [[ $sc != h ]]; then
    start_server "$sc" "$broker"
    run_bench "$sc" "$broker" "$sc" || true
    stop_servers
    return
  fi
  # (h): the maximum first (flat out, no reader: what the broker acknowledges), then half of it.
  start_server b "$broker"
  run_bench h "$broker" h-max --rate 0 --duration "$H_MAX_SECS" --no-readback || true
  stop_servers
  local max
  max=$(json_field "$RESULTS/h-max-$broker.json" acked_msgs_per_s)
  if [[ -z $max || $max -lt 2 ]]; then
    note "(h) $broker: no maximum measured, half-rate run skipped"
    echo 1 >"$RESULTS/h-$broker.rc"
    return
  fi
  note "(h) $broker: flat-out maximum $max acknowledged msg/s without a reader; measured at $((max / 2)) msg/s"
  start_server b "$broker"
  run_bench h "$broker" h --rate "$((max / 2))" --duration "$B_SECS" --drain-timeout "$DRAIN" --max-drain "$MAX_DRAIN" || true
  stop_servers
}

# ---------------------------------------------------------------------------------------------
# Set-up: binaries, peers, limits, what machine this is.

command -v python3 >/dev/null || die "python3 is needed to write the Markdown table"

if [[ -n ${ROOST_BIN:-} || -n ${BENCH_BIN:-} ]]; then
  ROOST_BIN=${ROOST_BIN:-$TARGET_DIR/release/roost}
  BENCH_BIN=${BENCH_BIN:-$TARGET_DIR/release/roost-bench}
  log "using prebuilt binaries: $ROOST_BIN, $BENCH_BIN"
else
  log "building roost and roost-bench (release) in $TARGET_DIR"
  # (`--bin roost -p roost-bench` would look for `roost` inside roost-bench only.)
  (cd "$REPO" && cargo build --release --bin roost --bin roost-bench)
  ROOST_BIN=$TARGET_DIR/release/roost
  BENCH_BIN=$TARGET_DIR/release/roost-bench
fi
[[ -x $ROOST_BIN && -x $BENCH_BIN ]] || die "missing binaries: $ROOST_BIN $BENCH_BIN"

if [[ " $BROKERS " == *" mosquitto "* ]] && ! command -v mosquitto >/dev/null; then
  log "installing mosquitto (Debian package)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
fi
if [[ " $BROKERS " == *" rumqttd "* ]]; then
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! command -v rumqttd >/dev/null; then
    log "installing rumqttd $RUMQTTD_VERSION (cargo install)"
    # Not --locked: its lock file pins metrics 0.22.1, which current Rust rejects (E0521).
    cargo install rumqttd --version "$RUMQTTD_VERSION"
  fi
fi
# The Debian package starts a system mosquitto on :1883; it is not used (own ports here).

# Each connection is a file descriptor in the generator and one in the server.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fd_limit=$(ulimit -n)
if [[ $fd_limit != unlimited ]] && ((IDLE + 512 > fd_limit)); then
  new=$((fd_limit - 512))
  note "(c) IDLE=$IDLE connections do not fit the open-files limit of $fd_limit (hard limit, cannot be raised here): measured with $new instead"
  IDLE=$new
fi

roost_version=$("$ROOST_BIN" --version 2>&1 | head -1)
bench_version=$("$BENCH_BIN" --version 2>&1 | head -1)
# (`mosquitto -h` exits non-zero: take its first line whatever the status.)
mosq_version="not installed" rumq_version="not installed"
if command -v mosquitto >/dev/null; then mosq_version=$( (mosquitto -h 2>&1 || true) | head -1); fi
if command -v rumqttd >/dev/null; then rumq_version=$( (rumqttd --version 2>&1 || true) | head -1); fi
cpu_model=$(lscpu 2>/dev/null | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
machine="$(nproc) cores, ${cpu_model:-unknown CPU}, $(awk '/MemTotal/ {printf "%.0f GiB RAM", $2/1048576}' /proc/meminfo), Linux $(uname -r)"
log "machine: $machine"
log "versions: $roost_version | $mosq_version | $rumq_version | $bench_version"

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
t_start=$SECONDS
for sc in $SCENARIOS; do
  for broker in $BROKERS; do
    measure "$sc" "$broker"
  done
done
elapsed=$((SECONDS - t_start))
log "all runs done in ${elapsed} s"

# ---------------------------------------------------------------------------------------------
# The Markdown section.

export WORK RESULTS NOTES COMMANDS DOC started elapsed machine roost_version bench_version mosq_version rumq_version
export QUICK SCENARIOS BROKERS PAYLOAD A_SECS B_SECS H_MAX_SECS B_DEVICES B_RATE B_INFLIGHT IDLE HOLD D_SECS D_LOOPS WARMUP DRAIN MAX_DRAIN
python3 - <<'PY'
import json, os, re
from pathlib import Path

env = os.environ
res = Path(env["RESULTS"])
titles = {
    "a": f"(a) 1 publisher, QoS 0, {env['PAYLOAD']} B, flat out, {env['A_SECS']} s",
    "b": f"(b) {env['B_DEVICES']} devices, QoS 1, {env['B_RATE']} msg/s total, {env['B_SECS']} s",
    "c": f"(c) {env['IDLE']} idle TLS connections, {env['HOLD']} s hold",
    "d": f"(d) TLS connect rate, {env['D_LOOPS']} loops, {env['D_SECS']} s",
    "h": f"(h) {env['B_DEVICES']} devices, QoS 1, at half of each broker's maximum (its acknowledged msg/s flat out with no reader, {env['H_MAX_SECS']} s, in the notes), {env['B_SECS']} s",
}

def fmt(v, unit="", scale=1.0, digits=0):
    if v is None:
        return "–"
    v = v / scale
    s = f"{v:,.{digits}f}"
    return s + unit

def row(sc, broker):
    p = res / f"{sc}-{broker}.json"
    rc = (res / f"{sc}-{broker}.rc").read_text().strip() if (res / f"{sc}-{broker}.rc").exists() else "?"
    try:
        d = json.loads(p.read_text().strip().splitlines()[-1])
    except Exception:
        return f"| {sc} | {broker} | no result (exit {rc}) | | | | | | | | | |"
    lat = ("handshake" if sc == "d" else "e2e")
    p50, p99 = d.get(f"{lat}_p50_us"), d.get(f"{lat}_p99_us")
    cells = [
        sc, broker,
        fmt(d.get("in_msgs_per_s")), fmt(d.get("out_msgs_per_s")),
        "–" if d.get("lost") is None else f"{d['lost']:,} ({d.get('lost_pct', 0):.2f} %)",
        fmt(p50, " ms", 1000, 2) + " / " + fmt(p99, " ms", 1000, 2) if p50 is not None else "–",
        fmt(d.get("puback_p99_us"), " ms", 1000, 2),
        fmt(d.get("server_cpu_s_per_m_msgs"), "", 1, 1),
        fmt(d.get("server_rss_held_kib", d.get("server_rss_after_kib")), " MiB", 1024, 1),
        fmt(d.get("rss_per_conn_bytes"), " KiB", 1024, 1) if sc in ("b", "c", "h") else "–",
        fmt(d.get("connects_per_s")),
        "ok" if rc == "0" else f"exit {rc}",
    ]
    return "| " + " | ".join(cells) + " |"

lines = []
lines.append("## Peer comparison")
lines.append("")
lines.append(f"Written by `benchmarks/compare.sh` on {env['started']} ({'QUICK=1 smoke sizes' if env['QUICK'] == '1' else 'full sizes'}; "
             f"{env['elapsed']} s). Server and load generator share the machine; each measurement starts a fresh server.")
lines.append("")
lines.append(f"- Machine: {env['machine']}")
lines.append(f"- Versions: `{env['roost_version']}` · `{env['mosq_version']}` · `{env['rumq_version']}` · `{env['bench_version']}`")
lines.append("- roost: `roost up` with the default `routes.lua`, durability `synced`; plain MQTT listener for (a) and (b), TLS for (c) and (d); "
             "CPU and RSS are the engine process's; messages are read back by polling the engine's consumer API (ops port): its cost is in the engine's CPU, "
             "and its polling (2 ms when idle) in the end-to-end latency.")
lines.append("- mosquitto, rumqttd: the generated configurations below; read back by one subscriber on `bench/#` at the publishers' QoS.")
lines.append("")
for sc in env["SCENARIOS"].split():
    lines.append(f"- {titles.get(sc, sc)}")
lines.append("")
lines.append("| sc. | broker | in msg/s | out msg/s | lost | p50 / p99 | PUBACK p99 | server CPU s / M msgs | server RSS | RSS / conn | connects/s | run |")
lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for sc in env["SCENARIOS"].split():
    for broker in env["BROKERS"].split():
        lines.append(row(sc, broker))
lines.append("")
lines.append("p50 / p99: publish → read back for (a) and (b); TCP connect → CONNACK (TLS included) for (d). "
             "Rates count the measured window only (after the warm-up). Lost: QoS 0 published but never read, QoS 1 acknowledged but never read. "
             "Server RSS: at the end of the run (of the hold for (c)); RSS / conn: (RSS with all connections open − RSS before) / connections "
             "(for (c) the JSON also has it at the end of the hold, `rss_per_conn_held_bytes`).")
notes = Path(env["NOTES"]).read_text().strip()
if notes:
    lines.append("")
    lines.append("Notes:")
    for n in notes.splitlines():
        lines.append(f"- {n}")
lines.append("")
lines.append("<details><summary>Commands and configurations</summary>")
lines.append("")
lines.append("```")
lines.append(Path(env["COMMANDS"]).read_text().rstrip())
roost_cmd = Path(env["WORK"]) / "roost.cmd"
if roost_cmd.exists():
    lines.append("")
    lines.append("# roost: " + roost_cmd.read_text().strip().replace(env["WORK"], "$WORK"))
lines.append("```")
for name in ("mosquitto.conf", "rumqttd.toml"):
    p = Path(env["WORK"]) / name
    if p.exists():
        lines.append("")
        lines.append(f"`{name}`:")
        lines.append("")
        lines.append("```")
        lines.append(p.read_text().rstrip().replace(env["WORK"], "$WORK"))
        lines.append("```")
lines.append("")
lines.append("</details>")
section = "<!-- compare:begin -->\n" + "\n".join(lines) + "\n<!-- compare:end -->"

doc = Path(env["DOC"])
text = doc.read_text() if doc.exists() else "# Benchmarks\n"
pattern = re.compile(r"<!-- compare:begin -->.*?<!-- compare:end -->", re.S)
if pattern.search(text):
    text = pattern.sub(lambda _: section, text)
else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
doc.parent.mkdir(parents=True, exist_ok=True)
doc.write_text(text)
print(section)
PY
log "updated $DOC"
