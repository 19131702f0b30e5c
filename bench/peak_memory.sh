#!/usr/bin/env bash
# Run a command and report the machine's peak used memory (MemTotal - MemAvailable, sampled
# every 2 s) while it runs, and the baseline before it: e.g. `bash bench/peak_memory.sh make demo`.
# Whole-machine numbers: run it on an otherwise idle machine.
set -uo pipefail
used() { awk '/MemTotal/{t=$2}/MemAvailable/{a=$2}END{printf "%d\n", (t-a)/1024}' /proc/meminfo; }
log=$(mktemp)
baseline=$(used)
( while true; do used >> "$log"; sleep 2; done ) &
sampler=$!
start=$(date +%s)
"$@"
rc=$?
kill "$sampler"
peak=$(sort -n "$log" | tail -1)
echo "peak_memory: exit $rc, wall $(( $(date +%s) - start )) s, baseline ${baseline} MiB, peak ${peak} MiB used"
rm -f "$log"
exit $rc
