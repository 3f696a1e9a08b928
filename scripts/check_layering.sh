#!/usr/bin/env bash
# The layering of DESIGN.md §3, checked on the real dependency graph (`cargo tree -e normal`):
# control links no glommio; the shared crate no glommio or RocksDB; the pure crates none of
# glommio, tokio, RocksDB. A sanity check first proves the check sees a dependency that is there.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}

deps() { # the normal (non-dev, non-build) dependency closure of crate $1, one name per line
  "$CARGO" tree -q -p "$1" -e normal --prefix none --format '{p}' | awk '{print $1}' | sort -u
}

fail=0
must_not() { # crate, then forbidden crates
  local crate=$1 tree bad
  shift
  tree=$(deps "$crate")
  for bad in "$@"; do
    if grep -qx -- "$bad" <<<"$tree"; then
      echo "layering: $crate depends on $bad ($("$CARGO" tree -q -p "$crate" -e normal -i "$bad" --prefix none --format '{p}' | sed -n 2p | awk '{print $1}') pulls it in)"
      fail=1
    fi
  done
}

# The check must be able to fail: the engine's server crate does link glommio and RocksDB.
server=$(deps roost-server)
for expected in glommio rocksdb tokio; do
  grep -qx "$expected" <<<"$server" || { echo "layering: the check is broken (roost-server shows no $expected)"; exit 1; }
done

must_not roost-control glommio
must_not roost-common glommio rocksdb librocksdb-sys
must_not roost-endpoints glommio rocksdb librocksdb-sys
for pure in roost-model roost-mqtt roost-amqp roost-http roost-eventhubs roost-iothub roost-registry roost-storage roost-session roost-twin roost-query roost-routing; do
  must_not "$pure" glommio tokio rocksdb librocksdb-sys
done
[ $fail -eq 0 ] && echo "layering: ok"
exit $fail
