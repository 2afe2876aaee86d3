#!/usr/bin/env bash
# Runs the load-generator benchmarks recorded in BENCHMARKS.md: builds release binaries, starts a release fleet
# with `cargo xtask up --release` (loopback only), runs each scenario with the parameters below, writes JSON
# reports (and the fan-out latency plot) to the output folder, and stops the fleet on exit, also on failure.
#
#   loadtest/run-benchmarks.sh [OUTPUT_DIR] [SCENARIO ...]      # default target/bench, all scenarios
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench}
shift || true
scenarios=${*:-idle fanout dm churn storm resume}
mkdir -p "$out"

cargo build --release -p loadtest
rm -f .dev/fleet.json
setsid cargo xtask up --release > "$out/fleet.log" 2>&1 &
fleet=$!
stop_fleet() {
    kill -INT -- "-$fleet" 2>/dev/null || true
    wait "$fleet" 2>/dev/null || true
}
trap stop_fleet EXIT
for _ in $(seq 1 900); do
    if grep -q '"token"' .dev/fleet.json 2>/dev/null; then break; fi
    if ! kill -0 "$fleet" 2>/dev/null; then echo "the fleet did not start; see $out/fleet.log" >&2; exit 1; fi
    sleep 1
done
grep -q '"token"' .dev/fleet.json || { echo "the fleet was not up within 15 minutes" >&2; exit 1; }

lt=./target/release/switchyard-loadtest
for s in $scenarios; do
    case $s in
        idle)   $lt idle --sockets 19000 --sources 2 --duration-secs 30 --json "$out/idle.json" ;;  # see run-idle-fleet.sh
        fanout) $lt fanout --rooms 20 --members 250 --rate 100 --duration-secs 20 \
                    --json "$out/fanout-100.json" --plot "$out/fanout-100.svg"
                $lt fanout --rooms 20 --members 250 --rate 400 --duration-secs 30 \
                    --json "$out/fanout-400.json" --plot "$out/fanout-400.svg" ;;
        dm)     $lt dm --users 1000 --rate 1000 --duration-secs 30 --json "$out/dm.json" ;;
        churn)  $lt churn --sockets 2000 --rate 200 --duration-secs 30 --json "$out/churn.json" ;;
        storm)  $lt storm --sockets 5000 --rooms 50 --rate 200 --duration-secs 30 --json "$out/storm.json" ;;
        resume) $lt resume --events 10000 --body-bytes 1000 --clients 50 --json "$out/resume.json" ;;
        *) echo "unknown scenario $s" >&2; exit 2 ;;
    esac
done
