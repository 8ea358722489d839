#!/usr/bin/env bash
# Runs the whole test suite N times in a row (default 10) and reports how many runs passed.
# Each run's output is kept in $REPEAT_LOGS (default: a new temporary folder) for the failures.
#   tests/repeat.sh 10                 # the whole suite, chaos tests included
#   tests/repeat.sh 3 --ignore=tests/chaos -x
set -uo pipefail
cd "$(dirname "$0")/.."
runs="${1:-10}"
shift || true
logs="${REPEAT_LOGS:-$(mktemp -d -t engine-repeat-XXXXXX)}"
mkdir -p "$logs"
passed=0
for i in $(seq 1 "$runs"); do
    started=$(date +%s)
    if python -m pytest -q -p no:cacheprovider "$@" >"$logs/run-$i.txt" 2>&1; then
        passed=$((passed + 1))
        outcome=passed
    else
        outcome="FAILED (see $logs/run-$i.txt)"
    fi
    echo "run $i/$runs: $outcome in $(($(date +%s) - started)) s: $(tail -n 1 "$logs/run-$i.txt")"
done
echo "$passed of $runs runs passed (logs in $logs)"
[ "$passed" -eq "$runs" ]
