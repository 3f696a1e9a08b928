#!/usr/bin/env bash
# Tests scripts/setup.sh's detection on simulated machines. Each case runs `setup.sh packages` in a
# private mount namespace where overlays hide files of this machine (overlayfs whiteouts) and add
# stand-ins, with a recording `apt-get` first on PATH; the case then checks which packages setup
# asked for. Runs as root or as a user (in a user namespace); `make test` runs it.
#
# The first case is the one that broke a new user: a fresh Debian 12 ships libclang-cpp.so.14
# but no libclang bindgen can load, and the old check took the one for the other.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

if [ "${1:-}" = "--inside" ]; then
  # ---- inside the namespace: $2 = case name, $3 = scratch dir ----
  case_name=$2 scratch=$3
  unset LIBCLANG_PATH # only the case about it sets it
  declare -A upper_of=()
  overlay_dir() { # mounts an overlay on directory $1 (once) and prints its upper dir
    local d=$1
    if [ -z "${upper_of[$d]:-}" ]; then
      local n=${#upper_of[@]}
      mkdir -p "$scratch/u$n" "$scratch/w$n"
      mount -t overlay overlay -o "lowerdir=$d,upperdir=$scratch/u$n,workdir=$scratch/w$n" "$d"
      upper_of[$d]=$scratch/u$n
    fi
  }
  # Changes go through the merged view, so overlayfs itself records them in the upper dir.
  hide() { # a file reads as absent (overlayfs leaves a whiteout); a directory as empty (tmpfs)
    local p
    for p in "$@"; do
      [ -e "$p" ] || [ -L "$p" ] || continue
      if [ -d "$p" ] && [ ! -L "$p" ]; then
        mount -t tmpfs -o mode=0755 tmpfs "$p"
      else
        overlay_dir "$(dirname "$p")"
        rm -f "$p"
      fi
    done
  }
  add() { # a stand-in executable, creating missing parents under the nearest existing directory
    local p=$1 base
    [ -e "$p" ] && return 0
    base=$(dirname "$p")
    while [ ! -d "$base" ]; do base=$(dirname "$base"); done
    overlay_dir "$base"
    mkdir -p "$(dirname "$p")"
    printf '#!/bin/sh\nexit 0\n' >"$p"
    chmod +x "$p"
  }
  libclang_files() { # every libclang library clang-sys could load, in the dirs it searches
    local d f
    for d in /usr/local/llvm*/lib* /usr/local/lib* /usr/local/lib*/* /usr/lib* /usr/lib*/* /usr/lib/llvm-*/lib; do
      [ -d "$d" ] || continue
      for f in "$d"/libclang.so "$d"/libclang.so.* "$d"/libclang-*.so "$d"/libclang-*.so.*; do
        [ -e "$f" ] || [ -L "$f" ] || continue
        case "${f##*/}" in libclang-cpp*) ;; *) echo "$f" ;; esac
      done
    done
  }
  # Stand-ins for everything setup checks, so each case changes only what it is about.
  all_but_headers() {
    add /usr/lib/x86_64-linux-gnu/libclang-14.so.14
    add /usr/bin/g++; add /usr/bin/make
    add /usr/sbin/mosquitto; add /usr/bin/mosquitto_pub; add /usr/bin/nats-server
  }
  all_present() {
    all_but_headers
    add /usr/lib/llvm-14/lib/clang/14.0.6/include/stddef.h
  }
  fresh_debian_libclang() { # a fresh Debian 12: libclang-cpp only
    # shellcheck disable=SC2046
    hide $(libclang_files)
    add /usr/lib/x86_64-linux-gnu/libclang-cpp.so.14
    add /usr/lib/llvm-14/lib/libclang-cpp.so.14
  }
  case "$case_name" in
    fresh-debian) all_present; fresh_debian_libclang ;;
    all-present) all_present ;;
    libclang-without-headers)
      hide /usr/lib/clang /usr/lib/llvm-*/lib/clang; all_but_headers
      [ -n "$(libclang_files)" ] || { echo "case setup failed: no libclang stand-in visible" >&2; exit 3; } ;;
    libclang-path)
      # LIBCLANG_PATH overrides the search: a libclang elsewhere counts, the system dirs do not.
      all_present; fresh_debian_libclang
      mkdir -p "$scratch/llvm"; : >"$scratch/llvm/libclang.so.1"
      export LIBCLANG_PATH=$scratch/llvm ;;
    tools-missing)
      all_present
      # shellcheck disable=SC2046
      hide $(type -ap g++ mosquitto mosquitto_pub nats-server) /usr/sbin/mosquitto ;;
    *) echo "unknown case $case_name" >&2; exit 2 ;;
  esac
  mkdir -p "$scratch/bin"
  cat >"$scratch/bin/apt-get" <<EOF
#!/bin/sh
echo "\$*" >>"$scratch/apt-get.log"
EOF
  chmod +x "$scratch/bin/apt-get"
  PATH="$scratch/bin:$PATH" "$root/scripts/setup.sh" packages >"$scratch/out" 2>&1
  exit $?
fi

# ---- outside: run each case and check what it asked apt-get for ----
# As root, a private mount namespace; otherwise a user namespace too (overlayfs mounts and
# whiteouts work there on Linux 5.11 and later).
ns=(unshare -m --propagation private)
[ "$(id -u)" -eq 0 ] || ns=(unshare -r -m --propagation private)
if ! "${ns[@]}" true 2>/dev/null; then
  echo "test_setup: cannot create a mount namespace (${ns[*]}); this test needs one" >&2
  exit 1
fi
fails=0
run_case() { # $1 case, $2 expected exit (0|1), $3 packages that must be installed, $4 that must not
  local c=$1 want_rc=$2 want=$3 dont=$4 scratch rc=0 installed p
  scratch=$(mktemp -d)
  "${ns[@]}" "$0" --inside "$c" "$scratch" || rc=$?
  installed=$(grep '^install' "$scratch/apt-get.log" 2>/dev/null || true)
  local ok=1
  [ "$rc" -eq "$want_rc" ] || { echo "  exit $rc, want $want_rc"; ok=0; }
  for p in $want; do
    grep -qw -- "$p" <<<"$installed" || { echo "  did not install $p"; ok=0; }
  done
  for p in $dont; do
    ! grep -qw -- "$p" <<<"$installed" || { echo "  installed $p, which is present"; ok=0; }
  done
  if [ -z "$want" ] && [ -s "$scratch/apt-get.log" ]; then echo "  called apt-get with nothing missing"; ok=0; fi
  if [ $ok -eq 1 ]; then
    echo "test_setup: $c ok"
  else
    echo "test_setup: $c FAILED; apt-get calls: $(tr "\n" ";" 2>/dev/null <"$scratch/apt-get.log" || true)"
    sed 's/^/  setup: /' "$scratch/out"
    fails=$((fails + 1))
  fi
  # overlayfs leaves its work dirs mode 000; as a user, make them removable first.
  chmod -R u+rwx "$scratch" 2>/dev/null || true
  rm -rf "$scratch"
}
# A fake apt-get installs nothing, so setup reports what is still missing and fails (exit 1).
run_case fresh-debian 1 "libclang-dev" "g++ make mosquitto mosquitto-clients nats-server"
run_case all-present 0 "" "libclang-dev"
run_case libclang-without-headers 1 "libclang-dev" "g++ mosquitto"
run_case libclang-path 0 "" "libclang-dev"
run_case tools-missing 1 "g++ mosquitto mosquitto-clients nats-server" "libclang-dev make"
[ $fails -eq 0 ] || { echo "test_setup: $fails case(s) failed"; exit 1; }
echo "test_setup: all cases passed"
