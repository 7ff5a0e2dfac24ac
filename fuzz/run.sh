#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) each, on stable without a sanitizer
# (`cargo fuzz run -s none`), from the corpus in fuzz/corpus/TARGET (kept in the repo; new
# inputs that reach new code are added there). A crash stops the run with its input saved in
# fuzz/artifacts/TARGET; make it a regression test, then fix it.
#
#   bash fuzz/run.sh [SECONDS]      # installs cargo-fuzz if missing
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --version 0.13.1 --locked
fi
targets=(wire_messages log_records unit_records scenario_scripts engine_snapshots)
cargo fuzz build -s none -O
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "== $t, ${secs} s"
  log=$(mktemp)
  # libFuzzer's exit status says whether it found a crash.
  if ! cargo fuzz run -s none -O "$t" "corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 >"$log" 2>&1; then
    grep -E "panicked|ERROR|SUMMARY|Test unit written" "$log" >&2 || tail -n 20 "$log" >&2
    echo "fuzz target $t failed: its input is in fuzz/artifacts/$t" >&2
    rm -f "$log"
    exit 1
  fi
  grep -E "Done [0-9]+ runs" "$log" || tail -n 3 "$log"
  rm -f "$log"
done
