#!/usr/bin/env bash
# Idle connections on a fresh hub: engine RSS per connection (roost-bench --idle) and engine CPU
# while they sit idle (utime+stime from /proc over 10 s of the hold). Used for the before/after
# figures of docs/benchmarks.md ("Foundations (issue 6)"); run it once per binary and mode.
#
#   benchmarks/idle.sh ROOST_BIN LABEL plain|tls|ws [CONNECTIONS]
#
# ws: MQTT over a WebSocket on the hub's port 443 listener (here 127.0.0.1:28444), as the SDKs'
# WebSocket transports connect.
#
# BENCH_BIN (default target/release/roost-bench) is the load generator. Listens on 127.0.0.1
# ports 21883, 28883, 28443, 28444, 28472, 29464, 29465; everything started is stopped on exit.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
R=$1 L=$2 MODE=$3 N=${4:-10000}
B=${BENCH_BIN:-${CARGO_TARGET_DIR:-$REPO/target}/release/roost-bench}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
D=$(mktemp -d /tmp/roost-idle.XXXXXX)
"$R" up --data-dir "$D/hub" --mqtt 127.0.0.1:28883 --plain-mqtt 127.0.0.1:21883 --service 127.0.0.1:28443 \
  --ops 127.0.0.1:29464 --control-ops 127.0.0.1:29465 --link 127.0.0.1:28472 --https 127.0.0.1:28444 --cores 2 >"$D/up.log" 2>&1 &
UP=$!
trap 'kill $UP 2>/dev/null; wait $UP 2>/dev/null; rm -rf "$D"' EXIT
for _ in $(seq 1 300); do grep -q "roost is up" "$D/up.log" && break; sleep 0.2; done
grep -q "roost is up" "$D/up.log" || { cat "$D/up.log"; exit 1; }
E=$(pgrep -f "engine --data-dir $D/hub" | head -1)
flag=""
[ "$MODE" = tls ] && flag="--tls"
[ "$MODE" = ws ] && flag="--tls --websocket"
"$B" --target roost --hub "$D/hub" $flag --idle -c "$N" --hold 28 --server-pid "$E" --json --label "$L-$MODE" \
  >"$D/out.json" 2>"$D/out.log" &
BENCH=$!
sleep 14 # connected by now (10,000 TLS connections take about 6 s here)
ticks() { awk '{print $14 + $15}' "/proc/$E/stat"; }
t0=$(ticks)
sleep 10
t1=$(ticks)
wait $BENCH || { tail -5 "$D/out.log"; exit 1; }
hz=$(getconf CLK_TCK)
python3 - "$D/out.json" "$L" "$MODE" "$t0" "$t1" "$hz" <<'PY'
import json, sys
path, label, mode, t0, t1, hz = sys.argv[1:]
d = json.load(open(path))
cpu_ms_per_s = (int(t1) - int(t0)) * 1000 / int(hz) / 10
print(f"{label} {mode}: {d['connections']} connections, "
      f"{d['rss_per_conn_held_bytes'] / 1024:.2f} KiB RSS each, engine CPU {cpu_ms_per_s:.0f} ms/s while idle")
PY
