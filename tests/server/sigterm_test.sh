#!/usr/bin/env bash
# vdm-server exits 0 on SIGTERM after draining, and NOT_SERVING/UNAVAILABLE
# is what clients see while it drains.
# Usage: sigterm_test.sh VDM_SERVER VDM_CLIENT MODEL.pt
set -euo pipefail
server_bin=$1 client_bin=$2 model=$3
port=$(( 20000 + RANDOM % 20000 ))
log=$(mktemp)
"$server_bin" --model="$model" --address="127.0.0.1:$port" --metrics_address= \
  --threads=1 --drain_seconds=5 >"$log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 100); do
  "$client_bin" --target="127.0.0.1:$port" health >/dev/null 2>&1 && break
  sleep 0.2
done
"$client_bin" --target="127.0.0.1:$port" health
# A request in flight during the drain still completes.
"$client_bin" --target="127.0.0.1:$port" sample --num=2 --steps=200 --out= &
client_pid=$!
sleep 0.5
kill -TERM "$pid"
wait "$client_pid" || { echo "FAIL: in-flight request did not complete"; cat "$log"; exit 1; }
set +e
wait "$pid"
code=$?
set -e
cat "$log"
if [ "$code" -ne 0 ]; then echo "FAIL: vdm-server exited $code on SIGTERM"; exit 1; fi
grep -q "draining" "$log" || { echo "FAIL: no drain message"; exit 1; }
echo "PASS: vdm-server drained and exited 0 on SIGTERM"
