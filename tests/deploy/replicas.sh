#!/usr/bin/env bash
# Deploy check 3: several replicas on one machine, as a Kubernetes client
# sees them through the headless Service.
#   bash tests/deploy/replicas.sh VDM_SERVER VDM_CLIENT MODEL.pt REPO_ROOT
# Starts three vdm-server processes with the cpu ConfigMap's flagfile
# (deploy/base/server.flags; model, loopback addresses on free ports, one
# thread and a short drain override it). Three vdm-client processes then send
# 10 Sample requests each (30 in all) over one round_robin channel each to all
# three replicas, retrying UNAVAILABLE. Once a third of the requests are done
# one replica is killed with SIGKILL (mid-request where possible). Asserts:
#  - every client exits 0 and all 30 requests completed, none failed;
#  - all three replicas answered before the kill, only the two survivors
#    after it, and each survivor answered some;
#  - the survivors' vdm_requests_total{method="Sample",code="OK"} equals the
#    number of responses the clients got from them;
#  - the survivors drain and exit 0 on SIGTERM.
# Every process this script starts is killed on exit. Runs in ~10-20 s.
set -euo pipefail
server=${1:?usage: replicas.sh VDM_SERVER VDM_CLIENT MODEL.pt REPO_ROOT}
client=${2:?usage: replicas.sh VDM_SERVER VDM_CLIENT MODEL.pt REPO_ROOT}
model=${3:?usage: replicas.sh VDM_SERVER VDM_CLIENT MODEL.pt REPO_ROOT}
repo=${4:?usage: replicas.sh VDM_SERVER VDM_CLIENT MODEL.pt REPO_ROOT}
flagfile="$repo/deploy/base/server.flags"
replicas=3
clients=3
repeat=10
total=$((clients * repeat))
drain=5

work=$(mktemp -d "${TMPDIR:-/tmp}/vdm-replicas.XXXXXX")
server_pids=()
client_pids=()
status=1
cleanup() {
  local pid
  for pid in "${client_pids[@]}" "${server_pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
  for pid in "${client_pids[@]}" "${server_pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "$status" -ne 0 ]; then
    for f in "$work"/*.log; do
      [ -f "$f" ] && { echo "==== $(basename "$f")"; cat "$f"; }
    done
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP  # so that cleanup runs on those too (ctest timeout)
fail() { echo "FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
start=$(now)

# GET /metrics from 127.0.0.1:PORT, with bash alone.
scrape() {
  local reply
  exec 3<>"/dev/tcp/127.0.0.1/$1" || return 1
  printf 'GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3
  reply=$(cat <&3)
  exec 3>&-
  printf '%s\n' "$reply"
}
# The value of the first sample of metric $2 whose labels contain all of $3..
# (0 when there is none). No early exit: that would SIGPIPE the scrape.
metric() {
  local port=$1 name=$2 text
  shift 2
  text=$(scrape "$port") || return 1
  awk -v name="$name" -v want="$*" '
    !found && index($0, name) == 1 {
      n = split(want, w, " "); ok = 1
      for (i = 1; i <= n; i++) if (index($0, w[i]) == 0) ok = 0
      if (ok) { value = $NF; found = 1 }
    }
    END { print found ? value : 0 }' <<<"$text"
}

[ -x "$server" ] && [ -x "$client" ] || fail "binaries not found: $server $client"
[ -f "$model" ] || fail "test model not found: $model (build target vdm_test_models)"
[ -f "$flagfile" ] || fail "missing $flagfile"

# ---- three replicas on free loopback ports (port 0: the kernel picks).
ports=()
metrics_ports=()
for i in $(seq 0 $((replicas - 1))); do
  "$server" --flagfile="$flagfile" --model="$model" --address=127.0.0.1:0 \
    --metrics_address=127.0.0.1:0 --threads=1 --drain_seconds=$drain \
    >"$work/server$i.log" 2>&1 &
  server_pids+=($!)
done
for i in $(seq 0 $((replicas - 1))); do
  for _ in $(seq 1 600); do
    grep -q ' on port [0-9]* (metrics port [0-9]*)' "$work/server$i.log" && break
    kill -0 "${server_pids[$i]}" 2>/dev/null || fail "replica $i exited during start-up"
    sleep 0.1
  done
  line=$(grep -o ' on port [0-9]* (metrics port [0-9]*)' "$work/server$i.log") ||
    fail "replica $i did not report its ports within 60 s"
  ports+=("$(echo "$line" | awk '{print $3}')")
  metrics_ports+=("$(echo "$line" | tr -d ')' | awk '{print $6}')")
  "$client" --target="127.0.0.1:${ports[$i]}" --max_attempts=1 --timeout_s=10 health \
    >/dev/null || fail "replica $i is not SERVING"
done
echo "replicas: gRPC ports ${ports[*]}, metrics ports ${metrics_ports[*]}, SERVING after $(elapsed "$start") s"

# ---- clients: round_robin over all three, retries on UNAVAILABLE.
target="ipv4:$(printf '127.0.0.1:%s,' "${ports[@]}")"
target=${target%,}
for c in $(seq 0 $((clients - 1))); do
  "$client" --target="$target" --lb_policy=round_robin --max_attempts=5 --timeout_s=120 \
    sample --num=2 --steps=40 --seed=$((c + 1)) --repeat=$repeat --out= \
    >"$work/client$c.log" 2>&1 &
  client_pids+=($!)
done
# (grep reads whole files here: grep -q at the end of a pipe can SIGPIPE the
# writer, which pipefail would turn into a false failure.)
ok_lines() { cat "$work"/client*.log | grep -c ': OK peer=' || true; }
answered_by() { cat "$work"/client*.log | grep -c ": OK peer=ipv4:127.0.0.1:$1 " || true; }

# ---- kill one replica once a third of the requests are done and every
# replica has answered; if possible while it is computing a request.
victim=1
for _ in $(seq 1 1200); do
  done_now=$(ok_lines)
  seen=0
  for p in "${ports[@]}"; do [ "$(answered_by "$p")" -gt 0 ] && seen=$((seen + 1)); done
  [ "$done_now" -ge $((total / 3)) ] && [ "$seen" -eq "$replicas" ] && break
  [ "$done_now" -ge "$total" ] && break
  sleep 0.05
done
[ "$seen" -eq "$replicas" ] || fail "not every replica answered before the kill ($seen of $replicas)"
in_flight=0
for _ in $(seq 1 100); do
  in_flight=$(metric "${metrics_ports[$victim]}" vdm_live_requests) || in_flight=0
  [ "${in_flight%.*}" -ge 1 ] && break
  sleep 0.02
done
kill -KILL "${server_pids[$victim]}"
wait "${server_pids[$victim]}" 2>/dev/null || true
done_at_kill=$(ok_lines)
echo "kill: replica $victim (port ${ports[$victim]}) killed with SIGKILL after $done_at_kill of" \
  "$total requests, at $(elapsed "$start") s, with ${in_flight%.*} request(s) in flight on it"
[ "$done_at_kill" -lt "$total" ] || fail "the clients finished before the kill; nothing was tested"
sleep 0.5  # a response the victim sent just before dying is printed by now
declare -A mark
for c in $(seq 0 $((clients - 1))); do mark[$c]=$(wc -l <"$work/client$c.log"); done

# ---- every request completes.
for c in $(seq 0 $((clients - 1))); do
  rc=0
  wait "${client_pids[$c]}" || rc=$?
  [ "$rc" -eq 0 ] || fail "client $c exited with $rc"
  grep -q "^repeat: $repeat/$repeat requests succeeded" "$work/client$c.log" ||
    fail "client $c: not all $repeat requests succeeded"
done
client_pids=()
[ "$(ok_lines)" -eq "$total" ] || fail "expected $total OK responses, got $(ok_lines)"
if grep -q '^request .*: [A-Z_]*:' "$work"/client*.log; then
  fail "some requests failed"
fi

# ---- who answered after the kill: the survivors only, both of them.
after=$(for c in $(seq 0 $((clients - 1))); do tail -n +"$((mark[$c] + 1))" "$work/client$c.log"; done)
if grep -q "peer=ipv4:127.0.0.1:${ports[$victim]} " <<<"$after"; then
  fail "the killed replica answered after the kill"
fi
for i in $(seq 0 $((replicas - 1))); do
  [ "$i" -eq "$victim" ] && continue
  n=$(grep -c "peer=ipv4:127.0.0.1:${ports[$i]} " <<<"$after" || true)
  [ "$n" -gt 0 ] || fail "survivor $i (port ${ports[$i]}) answered nothing after the kill"
done

# ---- the survivors' metrics agree with what the clients received.
summary=""
for i in $(seq 0 $((replicas - 1))); do
  [ "$i" -eq "$victim" ] && continue
  served=$(metric "${metrics_ports[$i]}" vdm_requests_total 'code="OK"' 'method="Sample"') ||
    fail "cannot scrape replica $i's /metrics"
  got=$(answered_by "${ports[$i]}")
  [ "${served%.*}" -eq "$got" ] ||
    fail "replica $i counts $served OK Sample calls, the clients got $got from it"
  summary+=" replica $i: $got;"
done
echo "answers:$summary replica $victim (killed): $(answered_by "${ports[$victim]}")"

# ---- the survivors drain and stop on SIGTERM.
for i in $(seq 0 $((replicas - 1))); do
  [ "$i" -eq "$victim" ] && continue
  kill -TERM "${server_pids[$i]}"
done
for i in $(seq 0 $((replicas - 1))); do
  [ "$i" -eq "$victim" ] && continue
  for _ in $(seq 1 $(((drain + 10) * 10))); do
    kill -0 "${server_pids[$i]}" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "${server_pids[$i]}" 2>/dev/null && fail "replica $i still runs $((drain + 10)) s after SIGTERM"
  rc=0
  wait "${server_pids[$i]}" || rc=$?
  [ "$rc" -eq 0 ] || fail "replica $i exited with $rc after SIGTERM"
  grep -q 'stopped' "$work/server$i.log" || fail "replica $i did not log its stop"
done
server_pids=()
status=0
echo "replicas: all $total requests completed across the kill, in $(elapsed "$start") s"
