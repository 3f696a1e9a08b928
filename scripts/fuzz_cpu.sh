#!/usr/bin/env bash
# Runs one cargo-fuzz target until it has used CPU_SECS of CPU time (not wall time), at nice 19,
# so a long run soaks up only what builds and tests leave idle. The figures in
# docs/reliability.md §8 come from this script:
#   scripts/fuzz_cpu.sh TARGET [CPU_SECS=3600]
# The target is built first (`cargo fuzz build -O`, as scripts/fuzz_smoke.sh builds it). It starts
# from the committed seed corpus plus a scratch corpus kept in $FUZZ_WORK (default
# /tmp/roost-fuzz-long/TARGET), so a run cut short can be resumed with what it had found. A crash
# fails the run and leaves its input in fuzz/artifacts/TARGET/. The last line reports executions,
# CPU seconds and wall seconds.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
t=${1:?usage: $0 TARGET [CPU_SECS]}
budget=${2:-3600}
work=${FUZZ_WORK:-/tmp/roost-fuzz-long/$t}
mkdir -p "$work" "corpus/$t" "artifacts/$t"
cargo +nightly fuzz build -O "$t" >/dev/null 2>&1 || cargo +nightly fuzz build -O "$t"
bin=$(ls -d target/*/release/"$t" | head -1)
log="$work/fuzz.log"
start=$(date +%s)
nice -n 19 "$bin" -artifact_prefix="artifacts/$t/" -rss_limit_mb=2048 -timeout=10 \
  -print_final_stats=1 "$work" "corpus/$t" >"$log" 2>&1 &
pid=$!
ticks=$(getconf CLK_TCK)
cpu=0
while kill -0 "$pid" 2>/dev/null; do
  # utime + stime of the fuzzer process (fields 14 and 15 of /proc/PID/stat), in seconds.
  if stat=$(cat "/proc/$pid/stat" 2>/dev/null); then
    cpu=$(echo "$stat" | awk -v hz="$ticks" '{ printf "%d", ($14 + $15) / hz }')
  fi
  if [ "$cpu" -ge "$budget" ]; then
    kill -INT "$pid"
    break
  fi
  sleep 5
done
rc=0
wait "$pid" || rc=$?
wall=$(( $(date +%s) - start ))
runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
[ -n "$runs" ] || runs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
corpus=$(find "$work" -maxdepth 1 -type f | wc -l)
# libFuzzer exits with 72 when interrupted (the budget was reached); anything else but 0 is a find.
if [ "$rc" -ne 0 ] && [ "$rc" -ne 72 ]; then
  tail -40 "$log"
  echo "fuzz-cpu: $t FAILED after ${cpu} CPU-s (exit $rc; input in fuzz/artifacts/$t/)" >&2
  exit 1
fi
echo "fuzz-cpu: $t ok: ${runs:-?} runs in ${cpu} CPU-s (${wall} s wall), 0 crashes, scratch corpus ${corpus} inputs"
