#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a short time (FUZZ_SECS, default 10 s each) from its
# committed seed corpus: what `make test` runs. New inputs libFuzzer finds go to a scratch
# corpus, not into fuzz/corpus. A crash fails the run and leaves its input in
# fuzz/artifacts/<target>/. Long runs (docs/reliability.md) are the same command with more time:
#   FUZZ_SECS=3600 scripts/fuzz_smoke.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS=${FUZZ_SECS:-10}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
scratch=$(mktemp -d /tmp/roost-fuzz.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
cargo +nightly fuzz build -O
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "corpus/$t"
  out=$(cargo +nightly fuzz run -O "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 2>&1) || {
    echo "$out" | tail -40
    echo "fuzz: $t FAILED (input in fuzz/artifacts/$t/)" >&2
    exit 1
  }
  # libFuzzer's own count ("Done N runs"); a `#N` progress line may be hidden by a dictionary.
  runs=$(echo "$out" | grep -oE 'Done [0-9]+ runs' | tail -1 | grep -oE '[0-9]+')
  echo "fuzz: $t ok (${runs:-?} runs in ${SECS} s, 0 crashes)"
done
