#!/usr/bin/env bash
# The short soak: vdm-soak's mixed load (every sampler, SampleStream,
# ScoreBPD, cancellations, deadlines, bad inputs) against vdm-server with the
# tiny model; no unexpected status code, and the median RSS over the last
# quarter of the calls within 20% of the second quarter's. The long version is a benchmark (docs/performance.md, "Soak").
# Usage: soak_test.sh VDM_SERVER VDM_SOAK VDM_CLIENT MODEL.pt [REQUESTS]
set -euo pipefail
server_bin=$1 soak_bin=$2 client_bin=$3 model=$4 requests=${5:-600}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log=$(mktemp)
"$server_bin" --model="$model" --address="127.0.0.1:$port" --metrics_address= \
  --threads=1 --max_batch=32 >"$log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 300); do
  "$client_bin" --target="127.0.0.1:$port" health >/dev/null 2>&1 && break
  sleep 0.2  # waiting for the process to start
done
"$soak_bin" --target="127.0.0.1:$port" --server_pid="$pid" \
  --requests="$requests" --concurrency=16 --steps=4 --max_rss_growth=0.2
kill -TERM "$pid"
wait "$pid"
