#!/usr/bin/env bash
# The pre-authentication flood of docs/reliability.md ("Bounded before authentication"):
#
#  1. memory: 10,000 sockets holding an unfinished 8,000-byte CONNECT (plain), and 10,000
#     silent TCP sockets at the TLS port, each alone: the engine's RSS per socket and how soon
#     each was closed;
#  2. the same 1,000 devices publishing QoS 1 at a fixed rate twice, without and then with the
#     flood beside them (10,000 silent sockets, --BAD_RATE failing CONNECTs per second,
#     --OVERSIZE_RATE oversize remaining-length claims per second): PUBACK p99 of each, and
#     every message read back (lost = 0).
#
#   benchmarks/preauth_flood.sh [ROOST_BIN]
#
# ROOST_BIN defaults to target/release/roost, BENCH_BIN to target/release/roost-bench. RATE
# (messages/s over the 1,000 devices, default 5000), BAD_RATE (default 10000), OVERSIZE_RATE
# (default 1000), SECS (default 20), SILENT (silent sockets, default 10000) change the load;
# UP_ARGS adds `roost up` flags (e.g. UP_ARGS="--limit new_connections_per_sec=6000", the
# connection rate of one S3 unit). Listens on 127.0.0.1 ports 31883, 38883,
# 38443, 38472, 39464, 39465; everything started is stopped on exit. Prints one JSON line per
# run and a summary.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T=${CARGO_TARGET_DIR:-$REPO/target}
R=${1:-$T/release/roost}
B=${BENCH_BIN:-$T/release/roost-bench}
RATE=${RATE:-5000} BAD_RATE=${BAD_RATE:-10000} OVERSIZE_RATE=${OVERSIZE_RATE:-1000} SECS=${SECS:-20} SILENT=${SILENT:-10000}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
D=$(mktemp -d /tmp/roost-flood.XXXXXX)
UP=""
trap '[ -n "$UP" ] && kill $UP 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
# A fresh hub for each measurement: RSS after an earlier one includes memory the allocator kept.
up() {
  [ -n "$UP" ] && { kill "$UP"; wait "$UP" 2>/dev/null || true; }
  rm -rf "$D/hub"
  "$R" up --data-dir "$D/hub" --mqtt 127.0.0.1:38883 --plain-mqtt 127.0.0.1:31883 --service 127.0.0.1:38443 \
    --ops 127.0.0.1:39464 --control-ops 127.0.0.1:39465 --link 127.0.0.1:38472 --cores 2 ${UP_ARGS:-} >"$D/up.log" 2>&1 &
  UP=$!
  for _ in $(seq 1 300); do grep -q "roost is up" "$D/up.log" && break; sleep 0.2; done
  grep -q "roost is up" "$D/up.log" || { cat "$D/up.log"; exit 1; }
  E=$(pgrep -f "engine --data-dir $D/hub" | head -1)
}
flood() { # label, address, extra flags...
  local label=$1 addr=$2
  shift 2
  nice -n "${FLOOD_NICE:-0}" "$B" --target mqtt --addr "$addr" --flood --server-pid "$E" --json --label "$label" "$@" 2>>"$D/flood.log"
}
publish() { # label
  "$B" --target roost --hub "$D/hub" -c 1000 --rate "$RATE" --qos 1 --duration "$SECS" --warmup 2 \
    --server-pid "$E" --json --label "$1" 2>>"$D/publish.log"
}

up
flood "memory/plain-8000B" 127.0.0.1:31883 --flood-silent "$SILENT" --flood-silent-bytes 8000 --duration 1 | tee "$D/mem-plain.json"
up
flood "memory/tls-silent" 127.0.0.1:38883 --flood-silent "$SILENT" --duration 1 | tee "$D/mem-tls.json"
up
publish "devices/alone" | tee "$D/alone.json"
# The attacker's busy half (failing CONNECTs, oversize claims) runs at nice 19: on one host it
# shares the cores with the engine and with the devices' client, which measures the latency,
# and a real attacker's CPU is not ours to spend (what it achieved is in its report). The
# silent sockets are a second attacker at normal priority, so the time it sees them closed is
# not its own scheduling delay.
FLOOD_NICE=19 flood "flood" 127.0.0.1:31883 --flood-bad-rate "$BAD_RATE" \
  --flood-oversize-rate "$OVERSIZE_RATE" --duration $((SECS + 4)) >"$D/flood.json" &
F=$!
flood "flood-silent" 127.0.0.1:31883 --flood-silent "$SILENT" --duration $((SECS + 4)) >"$D/flood-silent.json" &
G=$!
sleep 1
publish "devices/flooded" | tee "$D/flooded.json"
wait $F || true
wait $G || true
cat "$D/flood.json" "$D/flood-silent.json"
python3 - "$D" <<'PY'
import json, sys
d = sys.argv[1]
j = lambda n: json.load(open(f"{d}/{n}.json"))
for n in ("mem-plain", "mem-tls"):
    m = j(n)
    print(f"{m['label']}: {m['silent_opened']} sockets, {m['server_kib_per_silent_socket']:.2f} KiB engine RSS each, "
          f"closed {m['silent_closed']} (p99 {m['silent_closed_p99_s']:.2f} s, max {m['silent_closed_max_s']:.2f} s), "
          f"not closed {m['silent_not_closed']}")
a, f, fl, fs = j("alone"), j("flooded"), j("flood"), j("flood-silent")
for r in (a, f):
    print(f"{r['label']}: {r['published']} published, {r['acked']} acked, lost {r['lost']}, "
          f"duplicates {r['duplicates']}, PUBACK p50 {r['puback_p50_us'] / 1000:.2f} ms "
          f"p99 {r['puback_p99_us'] / 1000:.2f} ms")
print(f"flood: bad CONNECTs {fl['bad_connect_attempts']} ({fl['bad_connect_closed']} closed, "
      f"{fl['bad_connect_connect_errors']} not connected), oversize {fl['oversize_attempts']} "
      f"({fl['oversize_closed']} closed); silent {fs['silent_opened']}: closed p99 {fs['silent_closed_p99_s']:.2f} s max "
      f"{fs['silent_closed_max_s']:.2f} s, not closed {fs['silent_not_closed']}")
print(f"PUBACK p99 flooded / alone: {f['puback_p99_us'] / a['puback_p99_us']:.2f}")
PY
