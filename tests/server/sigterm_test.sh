#!/usr/bin/env bash
# vdm-server on SIGTERM: reports NOT_SERVING, lets in-flight calls finish,
# exits 0. A second SIGTERM during the drain cuts it short (in-flight calls
# fail with UNAVAILABLE) but the process still stops cleanly with 0: it is
# never killed by the signal, whichever thread receives it.
# Usage: sigterm_test.sh VDM_SERVER VDM_CLIENT MODEL.pt
set -euo pipefail
server_bin=$1 client_bin=$2 model=$3
log=$(mktemp)
pids=()
trap 'for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -f "$log"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits (bounded, 60 s) until /metrics shows a live request on worker 0.
wait_live() {
  python3 - "$1" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/metrics"
end = time.time() + 60
while time.time() < end:
    try:
        text = urllib.request.urlopen(url, timeout=2).read().decode()
        if 'vdm_live_requests{worker="0"} 1' in text:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.05)
sys.exit("no live request within 60 s")
PY
}

start_server() {  # drain seconds
  port=$(free_port) mport=$(free_port)
  "$server_bin" --model="$model" --address="127.0.0.1:$port" \
    --metrics_address="127.0.0.1:$mport" --threads=1 --drain_seconds="$1" \
    >"$log" 2>&1 &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 1 300); do
    "$client_bin" --target="127.0.0.1:$port" health >/dev/null 2>&1 && return 0
    sleep 0.2  # waiting for the process to start, not for the engine
  done
  echo "FAIL: server did not become healthy"; cat "$log"; exit 1
}

# 1. One SIGTERM: the in-flight request completes, exit 0.
start_server 20
"$client_bin" --target="127.0.0.1:$port" sample --num=2 --steps=300 --out= &
client_pid=$!
wait_live "$mport"
kill -TERM "$pid"
wait "$client_pid" || { echo "FAIL: in-flight request did not complete"; cat "$log"; exit 1; }
set +e; wait "$pid"; code=$?; set -e
cat "$log"
[ "$code" -eq 0 ] || { echo "FAIL: vdm-server exited $code on SIGTERM"; exit 1; }
grep -q "draining" "$log" || { echo "FAIL: no drain message"; exit 1; }

# 2. Two SIGTERMs (and a SIGINT): the drain is cut short, exit 0 all the same.
start_server 120
set +e
"$client_bin" --target="127.0.0.1:$port" --max_attempts=1 sample --num=64 \
  --steps=1000 --out= >"$log.client" 2>&1 &
client_pid=$!
set -e
wait_live "$mport"
start=$(date +%s)
kill -TERM "$pid"
for _ in $(seq 1 100); do grep -q "draining" "$log" && break; sleep 0.05; done
kill -TERM "$pid"
kill -INT "$pid" 2>/dev/null || true
set +e; wait "$pid"; code=$?; wait "$client_pid"; client_code=$?; set -e
elapsed=$(( $(date +%s) - start ))
cat "$log"
[ "$code" -eq 0 ] || { echo "FAIL: vdm-server exited $code after a second signal"; exit 1; }
grep -q "again" "$log" || { echo "FAIL: the second signal was not seen"; exit 1; }
[ "$client_code" -ne 0 ] || { echo "FAIL: the cut-off request claims success"; exit 1; }
grep -q "UNAVAILABLE" "$log.client" || { echo "FAIL: the client did not get UNAVAILABLE"; cat "$log.client"; exit 1; }
[ "$elapsed" -lt 60 ] || { echo "FAIL: the drain was not shortened ($elapsed s)"; exit 1; }
rm -f "$log.client"
echo "PASS: one SIGTERM drains; a second one cuts the drain short; exit 0 both times"
