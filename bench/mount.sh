#!/usr/bin/env bash
# Figures of `stripelock mount` (issue 13), all in one run on one local cluster (`up`, 3 servers):
#   1. sequential write and read of SIZE_MIB (default 1024) MiB through a mount (dd, 1 MiB
#      blocks, fsync at the end) against `stripelock put` / `get` of the same file, ROUNDS
#      (default 3) rounds alternating the two, with the median ratio (the disk's speed varies
#      from minute to minute on a shared machine: only ratios of one round are compared);
#   2. 4 KiB random writes under fcntl locks per second (lock the 4 KiB, pwrite, unlock);
#   3. fcntl lock/unlock cycles per second through the mount, against lock/unlock cycles of the
#      client library (`stripelock bench lock --clients 1`).
# Needs root and /dev/fuse. Every process it starts is stopped by its PID on exit.
# Env: SIZE_MIB, ROUNDS, SECS (default 5, for 2 and 3).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
SIZE_MIB="${SIZE_MIB:-1024}"
SECS="${SECS:-5}"
ROUNDS="${ROUNDS:-3}"
exe="$root/target/release/stripelock"
cargo build --release --quiet
work=$(mktemp -d /tmp/stripelock-bench-mount.XXXXXX)
pids=()
cleanup() {
  for d in "$work/a" "$work/b"; do "$exe" umount "$d" 2>/dev/null || true; done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/a" "$work/b"
(cd "$work" && exec "$exe" up --data "$work/data" >"$work/up.log" 2>&1) &
pids+=($!)
for _ in $(seq 100); do [ -s "$work/data/cluster" ] && break; sleep 0.1; done
export STRIPELOCK_CLUSTER STRIPELOCK_TLS_DIR
STRIPELOCK_CLUSTER=$(cat "$work/data/cluster")
STRIPELOCK_TLS_DIR="$work/data/tls"   # `up` serves mutual TLS
sleep 1
"$exe" mount "$work/a" --server 1 >"$work/a.log" 2>&1 &
pids+=($!)
"$exe" mount "$work/b" --server 2 >"$work/b.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q " $work/b " /proc/self/mounts && grep -q " $work/a " /proc/self/mounts && break; sleep 0.1; done

secs() { python3 -c 'import sys,time; print("%.3f" % (time.time()-float(sys.argv[1])))' "$1"; }
now() { python3 -c 'import time; print(time.time())'; }
rate() { python3 -c 'import sys; print("%.0f" % (float(sys.argv[1]) / float(sys.argv[2])))' "$1" "$2"; }
ratio() { python3 -c 'import sys; print("%.2f" % (float(sys.argv[1]) / float(sys.argv[2])))' "$1" "$2"; }

echo "== 1. sequential $SIZE_MIB MiB, $ROUNDS rounds alternating (MB/s; ratio mount / CLI, goal >= 0.7)"
head -c $((SIZE_MIB << 20)) /dev/urandom >"$work/src.bin"
mb=$((SIZE_MIB * 1048576 / 1000000))
printf "%-8s %12s %12s %8s %12s %12s %8s\n" "round" "mount write" "put" "ratio" "mount read" "get" "ratio"
wr=(); rr=()
for r in $(seq "$ROUNDS"); do
  t=$(now); "$exe" put "$work/src.bin" /bench/put.bin >/dev/null; put_s=$(secs "$t")
  t=$(now); dd if="$work/src.bin" of="$work/a/bench/mount.bin" bs=1M conv=fsync status=none; wm_s=$(secs "$t")
  t=$(now); "$exe" get /bench/put.bin "$work/get.bin" >/dev/null; get_s=$(secs "$t")
  t=$(now); dd if="$work/b/bench/mount.bin" of="$work/read.bin" bs=1M status=none; rm_s=$(secs "$t")
  cmp "$work/src.bin" "$work/read.bin" && cmp "$work/src.bin" "$work/get.bin"
  w=$(ratio "$put_s" "$wm_s"); rd=$(ratio "$get_s" "$rm_s"); wr+=("$w"); rr+=("$rd")
  printf "%-8s %12s %12s %8s %12s %12s %8s\n" "$r" "$(rate $mb "$wm_s")" "$(rate $mb "$put_s")" "$w" \
    "$(rate $mb "$rm_s")" "$(rate $mb "$get_s")" "$rd"
  rm -f "$work/read.bin" "$work/get.bin" "$work/a/bench/mount.bin"
  "$exe" rm /bench/put.bin >/dev/null
done
median() { printf "%s\n" "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "median ratio: write $(median "${wr[@]}"), read $(median "${rr[@]}")"
rm -f "$work/src.bin"

echo "== 2. 4 KiB random writes under fcntl locks ($SECS s, one process on mount a)"
head -c $((64 << 20)) /dev/zero >"$work/a/bench/rand.bin"
python3 - "$work/a/bench/rand.bin" "$SECS" <<'EOF'
import fcntl, os, random, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
blocks = (64 << 20) // 4096
buf = os.urandom(4096)
end = time.time() + float(sys.argv[2]); n = 0
while time.time() < end:
    off = random.randrange(blocks) * 4096
    fcntl.fcntl(fd, fcntl.F_SETLKW, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, off, 4096, 0))
    os.pwrite(fd, buf, off)
    fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi4x", fcntl.F_UNLCK, 0, off, 4096, 0))
    n += 1
print("4 KiB locked random writes: %.0f/s" % (n / float(sys.argv[2])))
EOF

echo "== 3. lock/unlock cycles per second, one process ($SECS s)"
python3 - "$work/a/bench/rand.bin" "$SECS" <<'EOF'
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
end = time.time() + float(sys.argv[2]); n = 0
while time.time() < end:
    fcntl.fcntl(fd, fcntl.F_SETLKW, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 100, 0))
    fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi4x", fcntl.F_UNLCK, 0, 0, 100, 0))
    n += 1
print("fcntl through the mount: %.0f cycles/s" % (n / float(sys.argv[2])))
EOF
"$exe" bench lock --clients 1 --duration "${SECS}s" 2>/dev/null | sed 's/^/client library: /'
