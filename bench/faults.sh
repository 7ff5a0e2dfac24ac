#!/usr/bin/env bash
# The fault campaign of issue 15, then its negative control. Run as root on a fresh machine:
#   bash bench/faults.sh            # 300 s of faults, recovery figures, then a 120 s negative control
#   bash bench/faults.sh --smoke    # 30 s and 90 s, no recovery figures (what CI runs)
# Other flags go to the campaign (`stripelock bench faults --help`), e.g. --seed 7 --servers 3.
# STRIPELOCK_BIN=path uses that binary instead of building the release one.
# Exit 0 only if the campaign found no violation and the negative control found some
# (FAULTS_ADVISORY=1: the campaign's violations are reported but only the negative control
# decides the exit status; CI sets it while the campaign's open findings are being fixed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "bench/faults.sh: run as root: the campaign makes network namespaces, nftables rules and a tmpfs" >&2
    exit 2
fi
need=()
command -v nft >/dev/null 2>&1 || need+=(nftables)
{ command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1; } || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
campaign=(--seconds 300)
negative=(--seconds 120)
if [ "${1:-}" = "--smoke" ]; then
    shift
    campaign=(--seconds 30 --no-recovery)
    negative=(--seconds 90)
fi
bin=${STRIPELOCK_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release -p stripelock
    bin=target/release/stripelock
fi
status=0
echo "== the campaign"
if ! "$bin" bench faults "${campaign[@]}" "$@"; then
    if [ "${FAULTS_ADVISORY:-}" = 1 ]; then
        echo "the campaign reported violations (advisory: see docs/reliability.md for the open findings)"
    else
        status=1
    fi
fi
echo "== the negative control: every server with fencing switched off"
# Whether a stale write lands depends on where the faults catch the writers: a short run can
# find nothing by chance (45 s runs found 0 in five tries one day, 4 to 11 on others; 90 s
# runs found 14 and 27). Up to three seeds, unless one is given; fencing off must show
# violations in one of them.
seeds=(1 2 3)
case " $* " in *" --seed "*) seeds=("") ;; esac
found=0
for seed in "${seeds[@]}"; do
    if "$bin" bench faults "${negative[@]}" --no-recovery --negative-control ${seed:+--seed "$seed"} "$@"; then
        found=1
        break
    fi
    [ -n "$seed" ] && echo "the negative control found nothing with seed $seed"
done
[ "$found" = 1 ] || status=1
exit $status
