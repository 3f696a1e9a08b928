#!/usr/bin/env bash
# The Event Hubs-compatible endpoint's read rate beside the JSON consumer API (issue 10 §7), on
# one fresh `roost up`:
#   1. scenario (a) of compare.sh fills the log alone (one pipelined publisher, QoS 0, 100 B,
#      flat out, SECS seconds);
#   2. live: an AMQP reader follows the log (`roost-bench --read-log amqp --follow`) while
#      scenario (a) runs again; it reports how far behind it was when the publisher stopped and
#      how long it took to catch up (keeping up: nothing behind, no catch-up);
#   3. the whole log is read back alternately through AMQP and through the JSON consumer API,
#      ROUNDS times each.
# Figures go into docs/benchmarks.md by hand.
#
#   benchmarks/eventhubs_read.sh            (release binaries from $CARGO_TARGET_DIR)
#   SECS=10 ROUNDS=2 ROOST_BIN=… BENCH_BIN=… benchmarks/eventhubs_read.sh
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
ROOST_BIN=${ROOST_BIN:-$TARGET_DIR/release/roost}
BENCH_BIN=${BENCH_BIN:-$TARGET_DIR/release/roost-bench}
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-2}
PORT=${PORT_BASE:-24000}
WORK=$(mktemp -d /tmp/roost-ehread.XXXXXX)
"$ROOST_BIN" up --data-dir "$WORK/data" --mqtt "127.0.0.1:$((PORT + 1))" --plain-mqtt "127.0.0.1:$((PORT + 2))" \
  --service "127.0.0.1:$((PORT + 3))" --ops "127.0.0.1:$((PORT + 4))" --control-ops "127.0.0.1:$((PORT + 5))" \
  --link "127.0.0.1:$((PORT + 6))" --amqp "127.0.0.1:$((PORT + 7))" >"$WORK/up.log" 2>&1 &
UP=$!
trap 'kill $UP 2>/dev/null; wait $UP 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 1 600); do grep -q '^roost is up' "$WORK/up.log" && break; sleep 0.1; done
grep -q '^roost is up' "$WORK/up.log" || { tail -20 "$WORK/up.log"; exit 1; }
ENGINE=$(pgrep -P "$UP" -f ' engine ' | head -1)
echo "# fill: scenario (a), $SECS s"
"$BENCH_BIN" --target roost --hub "$WORK/data" --connections 1 --qos 0 --payload 100 --duration "$SECS" \
  --warmup 1 --server-pid "$ENGINE" | grep -E 'in_msgs_per_s|out_msgs_per_s|lost |server_cpu'
echo "# live: an AMQP reader follows while scenario (a) runs again, $SECS s"
"$BENCH_BIN" --target roost --hub "$WORK/data" --read-log amqp --follow "$((SECS + 2))" --server-pid "$ENGINE" \
  >"$WORK/follow.txt" 2>/dev/null &
READER=$!
sleep 0.5
"$BENCH_BIN" --target roost --hub "$WORK/data" --connections 1 --qos 0 --payload 100 --duration "$SECS" \
  --warmup 1 --server-pid "$ENGINE" | grep -E 'in_msgs_per_s|out_msgs_per_s|lost |server_cpu'
wait "$READER" || true
grep -E 'behind_at_close|catch_up_secs|records_read|records_expected|records_per_sec|server_cpu' "$WORK/follow.txt"
for r in $(seq 1 "$ROUNDS"); do
  for via in amqp json; do
    echo "# read $r via $via"
    "$BENCH_BIN" --target roost --hub "$WORK/data" --read-log "$via" --server-pid "$ENGINE" 2>/dev/null \
      | grep -E 'records_read|records_per_sec|secs |server_cpu'
  done
done
