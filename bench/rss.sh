#!/usr/bin/env bash
# Issue 10: server RSS (VmRSS of /proc/PID/status, MB) of a 3-server `up`, at start, after
# `bench lock --clients 256 --duration 3s`, after 2,000 short `lock -- true` (each its own
# process and session, each on its own path), and idle 10 s later. With TRIM=1 it then calls
# glibc's malloc_trim(0) in each server through gdb, to tell memory the program still holds
# from free memory glibc keeps for reuse; STATS=1 prints each server's malloc_stats() (through
# gdb). LOCKS=N changes the 2,000. Extra environment (e.g. MALLOC_ARENA_MAX=2) reaches the
# servers through `up`.
#
#   bench/rss.sh [target/release/stripelock]
set -euo pipefail
EXE=$(realpath "${1:-target/release/stripelock}")
DIR=$(mktemp -d)
cd "$DIR"
"$EXE" up --servers 3 --data d --json > up.json 2> up.err &
UP=$!
trap 'kill -TERM $UP 2>/dev/null; wait $UP 2>/dev/null; rm -rf "$DIR"' EXIT
for _ in $(seq 100); do [ -s up.json ] && break; sleep 0.1; done
PIDS=$(python3 -c 'import json; print(" ".join(str(s["pid"]) for s in json.load(open("up.json"))["servers"]))')
CL=$(python3 -c 'import json; print(json.load(open("up.json"))["cluster"])')
export STRIPELOCK_TLS_DIR="$DIR/d/tls"   # `up` serves mutual TLS
rss() { for p in $PIDS; do awk '/VmRSS/ {printf "%.1f ", $2/1024}' "/proc/$p/status"; done; }
sleep 3
echo "start:            $(rss)"
"$EXE" bench lock --clients 256 --duration 3s --cluster "$CL" > /dev/null
echo "after bench:      $(rss)"
for i in $(seq "${LOCKS:-2000}"); do "$EXE" lock "/rss/$i" --cluster "$CL" -- true; done
echo "after ${LOCKS:-2000} locks: $(rss)"
sleep 10
echo "idle 10 s:        $(rss)"
if [ "${STATS:-0}" = 1 ]; then
  # glibc's own account, printed into each server's log: bytes in use by the program and bytes
  # taken from the system (the difference is free memory glibc keeps).
  for p in $PIDS; do gdb -p "$p" -batch -ex 'call (void) malloc_stats()' > /dev/null 2>&1 || true; done
  for i in 1 2 3; do
    awk '/^Total/ {t=1} t && /system bytes/ {s=$4} t && /in use bytes/ {u=$5; t=0}
         END {printf "server %d malloc: in use %.1f MB, from the system %.1f MB\n", '"$i"', u/1048576, s/1048576}' \
      "d/server-$i/server.log"
  done
fi
if [ "${TRIM:-0}" = 1 ]; then
  for p in $PIDS; do gdb -p "$p" -batch -ex 'call (int) malloc_trim(0)' > /dev/null 2>&1 || true; done
  echo "malloc_trim(0):   $(rss)"
fi
