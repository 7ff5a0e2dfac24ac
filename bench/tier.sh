#!/usr/bin/env bash
# Figures of the secondary tier (issue 14), in one run on one local cluster (`up`, 3 servers):
#   1. `migrate` of a SIZE_MIB (default 1024) MiB file and `recall` of it back, in MB/s, against
#      object_store's own put and get of as many bytes into a directory on the same disk
#      (`stripelock bench tier-raw`: 8 MiB parts hashed with blake3, 8 MiB reads), ROUNDS
#      (default 3) rounds alternating the two, with the median ratios;
#      also the cluster's own `put` and `get` of the same file in the same round (a migration
#      reads the file's stripes, a recall writes them: the bound the cluster itself sets);
#   2. time to the first byte of a 4 KiB read from the middle of the stub: a `cat --range`
#      from a fresh CLI process (process start, session, lock, read), median of 5, and the same
#      4 KiB of a striped file for comparison.
# Every process it starts is stopped by its PID on exit. Env: SIZE_MIB, ROUNDS.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
SIZE_MIB="${SIZE_MIB:-1024}"
ROUNDS="${ROUNDS:-3}"
exe="$root/target/release/stripelock"
cargo build --release --quiet
work=$(mktemp -d /tmp/stripelock-bench-tier.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

(cd "$work" && exec "$exe" up --data "$work/data" >"$work/up.log" 2>&1) &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/data/cluster" ] && break; sleep 0.1; done
export STRIPELOCK_CLUSTER STRIPELOCK_TLS_DIR
STRIPELOCK_CLUSTER=$(cat "$work/data/cluster")
STRIPELOCK_TLS_DIR="$work/data/tls"   # `up` serves mutual TLS
sleep 1
head -c $((SIZE_MIB << 20)) /dev/urandom >"$work/src.bin"
"$exe" put "$work/src.bin" /bench/striped >/dev/null
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

echo "== migrate and recall of $SIZE_MIB MiB vs object_store put and get, $ROUNDS rounds"
printf "%-6s %12s %10s %7s %12s %10s %7s %12s %12s\n" round migrate os-put ratio recall os-get ratio cluster-get cluster-put
mr=() rr=()
secs() { python3 -c "import time; print(time.time())"; }
for r in $(seq "$ROUNDS"); do
  t0=$(secs); "$exe" put "$work/src.bin" /bench/f$r >/dev/null; t1=$(secs)
  cput=$(python3 -c "print($SIZE_MIB*1048576/($t1-$t0)/1e6)")
  t0=$(secs); "$exe" get /bench/f$r "$work/out.bin" >/dev/null; t1=$(secs)
  cget=$(python3 -c "print($SIZE_MIB*1048576/($t1-$t0)/1e6)")
  rm -f "$work/out.bin"
  mig=$("$exe" migrate /bench/f$r --json | field 'd["files"][0]["mb_per_s"]')
  raw=$("$exe" bench tier-raw --dir "$work/data/tier-raw" --mib "$SIZE_MIB" --json)
  put=$(echo "$raw" | field 'd["put_mb_per_s"]')
  get=$(echo "$raw" | field 'd["get_mb_per_s"]')
  rec=$("$exe" recall /bench/f$r --json | field 'd["files"][0]["mb_per_s"]')
  m=$(python3 -c "print(round($mig/$put, 2))")
  c=$(python3 -c "print(round($rec/$get, 2))")
  mr+=("$m") rr+=("$c")
  printf "%-6s %9.0f MB/s %5.0f MB/s %7s %9.0f MB/s %5.0f MB/s %7s %7.0f MB/s %7.0f MB/s\n" "$r" "$mig" "$put" "$m" "$rec" "$get" "$c" "$cget" "$cput"
  "$exe" rm /bench/f$r >/dev/null
done
echo "median ratio: migrate/put $(printf '%s\n' "${mr[@]}" | median)  recall/get $(printf '%s\n' "${rr[@]}" | median)  (goal >= 0.8)"

echo "== 4 KiB read from the middle of a $SIZE_MIB MiB file: stub vs striped (fresh CLI process each)"
"$exe" put "$work/src.bin" /bench/stub >/dev/null
"$exe" migrate /bench/stub >/dev/null
mid=$(( (SIZE_MIB << 19) ))
ttfb() {
  for _ in 1 2 3 4 5; do
    t0=$(date +%s%N)
    "$exe" cat "$1" --range "$mid..$((mid + 4096))" >/dev/null
    t1=$(date +%s%N)
    echo $(( (t1 - t0) / 1000000 ))
  done | median
}
echo "stub: $(ttfb /bench/stub) ms; striped: $(ttfb /bench/striped) ms (median of 5; goal for the stub <= 50 ms)"

echo "== partial recall: 4 KiB written into a $SIZE_MIB MiB stub, and recall --range of 4 KiB (fresh CLI process each)"
# Each at a new row of the stub (rows 8 MiB apart at most), so each recalls one row; the
# stub was read above with the server's recall-on-read: migrate it again first.
"$exe" put "$work/src.bin" /bench/partial >/dev/null
"$exe" migrate /bench/partial >/dev/null
rb=$("$exe" stat /bench/partial --json | field 'd["layout"]["stripe_unit"] * d["layout"]["data"]')
partial() {
  for i in 1 2 3 4 5; do
    at=$(( (i * 16 + 3) * rb + 100 ))
    t0=$(date +%s%N)
    if [ "$1" = write ]; then
      head -c 4096 /dev/urandom | "$exe" write /bench/partial --offset "$at" >/dev/null
    else
      "$exe" recall /bench/partial --range "$((at + 200 * rb))..$((at + 200 * rb + 4096))" >/dev/null
    fi
    t1=$(date +%s%N)
    echo $(( (t1 - t0) / 1000000 ))
  done | median
}
w=$(partial write)
r=$(partial recall)
left=$("$exe" stat /bench/partial --json | field '"%d of %d rows striped again" % (d["tier_rows_recalled"], d["tier_rows"])')
echo "write of 4 KiB: $w ms; recall --range of 4 KiB: $r ms (median of 5, rows of $((rb >> 20)) MiB; $left)"
