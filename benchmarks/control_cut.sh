#!/usr/bin/env bash
# Control cut under load (docs/reliability.md §5): 1,000 known devices publish QoS 1 at a fixed
# rate while the control plane is stopped for CUT seconds (default 300) and started again; the
# devices must see no error and lose nothing (the engine runs on its registry replica).
#
#   benchmarks/control_cut.sh [ROOST_BIN]
#
# ROOST_BIN defaults to target/release/roost, BENCH_BIN to target/release/roost-bench; RATE
# (default 2000 msgs/s) and CUT (seconds) change the run. Listens on 127.0.0.1 ports 41883,
# 48883, 48443, 48472, 49464, 49465; everything started is stopped on exit.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
T=${CARGO_TARGET_DIR:-$REPO/target}
R=${1:-$T/release/roost}
B=${BENCH_BIN:-$T/release/roost-bench}
RATE=${RATE:-2000} CUT=${CUT:-300}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
D=$(mktemp -d /tmp/roost-cut.XXXXXX)
CONTROL="" ENGINE=""
trap 'kill $CONTROL $ENGINE 2>/dev/null; wait 2>/dev/null; rm -rf "$D"' EXIT
control() {
  "$R" control --data-dir "$D/hub" --service 127.0.0.1:48443 --ops 127.0.0.1:49465 --link 127.0.0.1:48472 \
    >>"$D/control.log" 2>&1 &
  CONTROL=$!
  for _ in $(seq 1 100); do curl -sf http://127.0.0.1:49465/healthz >/dev/null && return; sleep 0.2; done
  echo "control did not start"; exit 1
}
control
"$R" engine --data-dir "$D/hub" --control 127.0.0.1:48472 --mqtt 127.0.0.1:48883 --plain-mqtt 127.0.0.1:41883 \
  --ops 127.0.0.1:49464 --cores 2 >>"$D/engine.log" 2>&1 &
ENGINE=$!
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:49464/healthz >/dev/null && break; sleep 0.2; done
# The devices are created (through control) before the cut: the engine knows them.
"$B" --target roost --hub "$D/hub" -c 1000 --rate 100 --qos 1 --duration 2 --no-readback >/dev/null 2>&1
"$B" --target roost --hub "$D/hub" -c 1000 --rate "$RATE" --qos 1 --duration $((CUT + 40)) --warmup 2 \
  --server-pid "$ENGINE" --json --label "control-cut-$CUT" >"$D/run.json" 2>"$D/run.log" &
BENCH=$!
sleep 20
kill "$CONTROL"; wait "$CONTROL" 2>/dev/null || true
echo "control stopped at $(date +%T) for $CUT s"
sleep "$CUT"
control
echo "control back at $(date +%T)"
wait $BENCH || { tail -5 "$D/run.log"; exit 1; }
cat "$D/run.json"
python3 - "$D/run.json" "$CUT" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"control cut {sys.argv[2]} s under {d['rate_target_msgs_per_s']:.0f} msgs/s from {d['connections']} devices: "
      f"{d['published']} published, {d['acked']} acked, lost {d['lost']}, duplicates {d['duplicates']}, "
      f"connection errors {d['connection_errors']}, PUBACK p99 {d['puback_p99_us'] / 1000:.1f} ms")
PY
