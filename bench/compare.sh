#!/usr/bin/env bash
# Measures, in one run on loopback with the same client counts: stripelock (3 durable servers,
# `stripelock bench lock`), etcd's lock API (Lock + Unlock, on disk) as one member and as three
# members on loopback (like our three servers), and Redis in memory (SET NX PX + DEL). Two
# cases: one resource per client (nothing contends), and every client on one resource (each
# cycle a hand-off). Then lease renewals: `stripelock bench lease` against etcd's
# LeaseKeepAlive, with LEASE_SESSIONS (default "16 1000") sessions or streams. Prints one table
# per case with ratios.
# Installs Debian's etcd-server and redis-server if they are missing. Every process it starts is
# stopped by its PID on exit. Env: CLIENTS (default "1 16 64"), SECS per case (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
CLIENTS="${CLIENTS:-1 16 64}"
LEASE_SESSIONS="${LEASE_SESSIONS:-16 1000}"
SECS="${SECS:-3}"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

install_if_missing() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "installing $2 ..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  fi
}
install_if_missing etcd etcd-server
install_if_missing redis-server redis-server
# Only the etcd client crate needs protoc; stripelock itself compiles its proto without it.
install_if_missing protoc protobuf-compiler

echo "building ..." >&2
cargo build --release -q
cargo build --release -q --manifest-path bench/compare/Cargo.toml
compare="$root/bench/compare/target/release/compare"
stripelock="$root/target/release/stripelock"

etcd --name bench --data-dir "$work/etcd" \
  --listen-client-urls http://127.0.0.1:23791 --advertise-client-urls http://127.0.0.1:23791 \
  --listen-peer-urls http://127.0.0.1:23801 --initial-advertise-peer-urls http://127.0.0.1:23801 \
  --initial-cluster bench=http://127.0.0.1:23801 >"$work/etcd.log" 2>&1 &
pids+=($!)
# Three members on loopback, each with its own data directory on disk.
members="m1=http://127.0.0.1:23811,m2=http://127.0.0.1:23812,m3=http://127.0.0.1:23813"
for i in 1 2 3; do
  etcd --name "m$i" --data-dir "$work/etcd3-$i" \
    --listen-client-urls "http://127.0.0.1:2372$i" --advertise-client-urls "http://127.0.0.1:2372$i" \
    --listen-peer-urls "http://127.0.0.1:2381$i" --initial-advertise-peer-urls "http://127.0.0.1:2381$i" \
    --initial-cluster "$members" --initial-cluster-state new >"$work/etcd3-$i.log" 2>&1 &
  pids+=($!)
done
etcd3="127.0.0.1:23721,127.0.0.1:23722,127.0.0.1:23723"
redis-server --port 63791 --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
(cd "$work" && exec "$stripelock" up --data "$work/stripelock") >"$work/up.log" 2>&1 &
export STRIPELOCK_TLS_DIR="$work/stripelock/tls"   # `up` serves mutual TLS
pids+=($!)

for _ in $(seq 100); do
  if "$stripelock" status --cluster "$(cat "$work/stripelock/cluster" 2>/dev/null || echo 127.0.0.1:1)" >/dev/null 2>&1 \
    && (exec 3<>/dev/tcp/127.0.0.1/23791) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/63791) 2>/dev/null \
    && (exec 3<>/dev/tcp/127.0.0.1/23721) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/23723) 2>/dev/null; then
    break
  fi
  sleep 0.2
done
cluster=$(cat "$work/stripelock/cluster")
sleep 1

results="$work/results.jsonl"
for n in $CLIENTS; do
  echo "measuring $n client(s) ..." >&2
  "$compare" etcd 127.0.0.1:23791 "$n" "$SECS" etcd >>"$results"
  "$compare" etcd "$etcd3" "$n" "$SECS" etcd3 >>"$results"
  "$compare" etcd-shared 127.0.0.1:23791 "$n" "$SECS" etcd_shared >>"$results"
  "$compare" etcd-shared "$etcd3" "$n" "$SECS" etcd3_shared >>"$results"
  "$compare" redis 127.0.0.1:63791 "$n" "$SECS" redis >>"$results"
done
clients_csv=$(echo "$CLIENTS" | tr ' ' ',')
"$stripelock" bench lock --cluster "$cluster" --clients "$clients_csv" --duration "${SECS}s" --json >"$work/stripelock.json"
leases="$work/leases.jsonl"
for n in $LEASE_SESSIONS; do
  echo "measuring lease renewals with $n session(s) ..." >&2
  "$compare" etcd-keepalive 127.0.0.1:23791 "$n" "$SECS" etcd >>"$leases"
  "$compare" etcd-keepalive "$etcd3" "$n" "$SECS" etcd3 >>"$leases"
  "$stripelock" bench lease --cluster "$cluster" --sessions "$n" --duration "${SECS}s" --json \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"system":"stripelock","clients":d["sessions"],"cycles_per_s":d["renewals_per_s"],"p50_us":d["p50_us"],"p99_us":d["p99_us"]}))' >>"$leases"
done

python3 - "$results" "$work/stripelock.json" "$leases" <<'PY'
import json, sys
peers = [json.loads(l) for l in open(sys.argv[1])]
ours = json.load(open(sys.argv[2]))
def peer(system, c):
    return next(p for p in peers if p['system'] == system and p['clients'] == c)
def mine(workload, c):
    return next(x for x in ours['cases'] if x['clients'] == c and x['workload'] == workload)
clients = sorted({p['clients'] for p in peers})
print("one resource per client (nothing contends): lock+unlock cycles/s")
print(f"{'clients':>7}  {'stripelock':>10} {'p50':>8} {'p99':>8}  {'etcd 1':>7} {'p50':>8}  {'etcd 3':>7} {'p50':>8}  "
      f"{'redis':>7} {'p50':>7}  {'vs etcd1':>8} {'vs etcd3':>8} {'vs redis':>8}")
for c in clients:
    s, e, e3, r = mine('ex_own', c), peer('etcd', c), peer('etcd3', c), peer('redis', c)
    print(f"{c:>7}  {s['cycles_per_s']:>10.0f} {s['p50_us']:>6}us {s['p99_us']:>6}us  {e['cycles_per_s']:>7.0f} {e['p50_us']:>6}us  "
          f"{e3['cycles_per_s']:>7.0f} {e3['p50_us']:>6}us  {r['cycles_per_s']:>7.0f} {r['p50_us']:>5}us  "
          f"{s['cycles_per_s']/e['cycles_per_s']:>7.2f}x {s['cycles_per_s']/e3['cycles_per_s']:>7.2f}x {s['cycles_per_s']/r['cycles_per_s']:>7.2f}x")
print()
print("every client on one resource (each cycle a hand-off): hand-offs/s")
print(f"{'clients':>7}  {'stripelock':>10} {'p50':>8}  {'etcd 1':>7} {'p50':>8}  {'etcd 3':>7} {'p50':>8}  {'vs etcd1':>8} {'vs etcd3':>8}")
for c in clients:
    s, e, e3 = mine('ex_contended', c), peer('etcd_shared', c), peer('etcd3_shared', c)
    print(f"{c:>7}  {s['cycles_per_s']:>10.0f} {s['p50_us']:>6}us  {e['cycles_per_s']:>7.0f} {e['p50_us']:>6}us  "
          f"{e3['cycles_per_s']:>7.0f} {e3['p50_us']:>6}us  "
          f"{s['cycles_per_s']/e['cycles_per_s']:>7.2f}x {s['cycles_per_s']/e3['cycles_per_s']:>7.2f}x")
print()
print("shared reads of one file through each server's gateway cache (seed 002; etcd and redis have no shared lock,")
print("so their exclusive cycle is the only figure to set beside it):")
print(f"{'clients':>7}  {'PR via gateway':>14} {'p50':>8} {'p99':>8}  {'vs etcd1':>8} {'vs redis':>8}")
for c in clients:
    g, e, r = mine('pr_gateway', c), peer('etcd', c), peer('redis', c)
    print(f"{c:>7}  {g['cycles_per_s']:>14.0f} {g['p50_us']:>6}us {g['p99_us']:>6}us  "
          f"{g['cycles_per_s']/e['cycles_per_s']:>7.2f}x {g['cycles_per_s']/r['cycles_per_s']:>7.2f}x")
print(f"stripelock cached re-grant (no round trip): {ours['cached_regrant_per_s']:.0f}/s")
print()
leases = [json.loads(l) for l in open(sys.argv[3])]
print("lease renewals/s (stripelock: heartbeats on session streams, 4 outstanding each; etcd: LeaseKeepAlive, 4 outstanding)")
print(f"{'sessions':>8}  {'stripelock':>10} {'p50':>9}  {'etcd 1':>7} {'p50':>9}  {'etcd 3':>7} {'p50':>9}  {'vs etcd1':>8} {'vs etcd3':>8}")
for n in sorted({l['clients'] for l in leases}):
    s, e, e3 = (next(l for l in leases if l['system'] == k and l['clients'] == n) for k in ('stripelock', 'etcd', 'etcd3'))
    print(f"{n:>8}  {s['cycles_per_s']:>10.0f} {s['p50_us']:>7}us  {e['cycles_per_s']:>7.0f} {e['p50_us']:>7}us  "
          f"{e3['cycles_per_s']:>7.0f} {e3['p50_us']:>7}us  {s['cycles_per_s']/e['cycles_per_s']:>7.2f}x {s['cycles_per_s']/e3['cycles_per_s']:>7.2f}x")
print("stripelock: 3 servers, durable (fsync); etcd 1: one member on disk; etcd 3: three members on loopback, on disk;")
print("redis: in memory")
PY
