#!/usr/bin/env bash
# Holds many idle sockets on one machine, where a process may open at most 20,000 files: starts a release fleet
# with GATEWAYS gateways (`cargo xtask up --release --gateways N`, loopback only), runs one `idle` load generator
# per gateway (SOCKETS each, from GATEWAYS source addresses 127.0.0.x), samples every gateway's open sockets and
# RSS (from its /metrics and /proc) every two seconds while they run, and stops the fleet on exit, also on failure.
#
#   loadtest/run-idle-fleet.sh [OUTPUT_DIR] [GATEWAYS] [SOCKETS] [HOLD_SECS] [CONCURRENCY]
#                                                  # default target/bench 6 16667 90 32 (connects in flight each)
#   NO_BUILD=1 skips building the load generator (when it is built already).
#
# Writes OUTPUT_DIR/idle-gw<N>.json (each generator's report) and OUTPUT_DIR/idle-fleet.tsv (the samples), and
# prints the sample with the most sockets open at once, with each gateway's RSS then.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench}
gateways=${2:-6}
sockets=${3:-16667}
hold=${4:-90}
# Connects in flight per generator: all generators and gateways share the machine's cores, and too many at once
# make upgrades wait past the gateway's header-read timeout.
concurrency=${5:-32}
mkdir -p "$out"

[ -n "${NO_BUILD:-}" ] || cargo build --release -p loadtest
rm -f .dev/fleet.json .dev/fleet-*.json
setsid cargo xtask up --release --gateways "$gateways" > "$out/fleet.log" 2>&1 &
fleet=$!
generators=()
stop_all() {
    for pid in "${generators[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    kill -INT -- "-$fleet" 2>/dev/null || true
    wait "$fleet" 2>/dev/null || true
}
trap stop_all EXIT
last=.dev/fleet.json
[ "$gateways" -gt 1 ] && last=.dev/fleet-$gateways.json
for _ in $(seq 1 900); do
    if grep -q '"token"' "$last" 2>/dev/null; then break; fi
    if ! kill -0 "$fleet" 2>/dev/null; then echo "the fleet did not start; see $out/fleet.log" >&2; exit 1; fi
    sleep 1
done
grep -q '"token"' "$last" || { echo "the fleet was not up within 15 minutes" >&2; exit 1; }

files=(.dev/fleet.json)
for n in $(seq 2 "$gateways"); do files+=(".dev/fleet-$n.json"); done
http=()
pids=()
for f in "${files[@]}"; do
    h=$(sed -n 's/.*"http": "\(.*\)".*/\1/p' "$f")
    port=${h##*:}
    http+=("$h")
    pids+=("$(ss -Hltnp "sport = :$port" | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1)")
done

lt=./target/release/switchyard-loadtest
for i in "${!files[@]}"; do
    n=$((i + 1))
    $lt idle --fleet "${files[$i]}" --sockets "$sockets" --sources "$gateways" --duration-secs "$hold" \
        --connect-concurrency "$concurrency" --deadline-secs $((hold + 900)) --json "$out/idle-gw$n.json" > "$out/idle-gw$n.log" 2>&1 &
    generators+=($!)
done

# Sample while any generator runs: total open sockets, then each gateway's open sockets and RSS (KiB).
printf 'secs\ttotal_open' > "$out/idle-fleet.tsv"
for n in $(seq 1 "$gateways"); do printf '\tgw%s_open\tgw%s_rss_kib' "$n" "$n" >> "$out/idle-fleet.tsv"; done
echo >> "$out/idle-fleet.tsv"
start=$(date +%s)
while :; do
    running=0
    for pid in "${generators[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
    [ $running = 1 ] || break
    total=0
    row=""
    for i in "${!http[@]}"; do
        open=$(curl -s --max-time 2 "${http[$i]}/metrics" \
            | awk '/^switchyard_gateway_open_sockets/ {s += $NF} END {printf "%d", s}')
        rss=$(awk '/^VmRSS:/ {print $2}' "/proc/${pids[$i]}/status" 2>/dev/null || echo 0)
        total=$((total + ${open:-0}))
        row+=$(printf '\t%s\t%s' "${open:-0}" "$rss")
    done
    printf '%s\t%s%s\n' "$(($(date +%s) - start))" "$total" "$row" >> "$out/idle-fleet.tsv"
    sleep 2
done

failed=0
for i in "${!generators[@]}"; do
    if ! wait "${generators[$i]}"; then
        echo "generator $((i + 1)) failed; see $out/idle-gw$((i + 1)).log" >&2
        failed=1
    fi
done
echo "the sample with the most sockets open at once (secs, total, then open and RSS KiB per gateway):"
sort -t$'\t' -k2,2n "$out/idle-fleet.tsv" | tail -1
for n in $(seq 1 "$gateways"); do
    grep -E "gateway RSS per socket|still open|load client RSS" "$out/idle-gw$n.log" | sed "s/^/gw$n /"
done
exit $failed
