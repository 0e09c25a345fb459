#!/usr/bin/env bash
# Deploy check 2: the flags, ports and probes in the rendered overlays match
# what vdm-server accepts.
#   bash tests/deploy/check_manifests.sh VDM_SERVER REPO_ROOT
# - every flag in the ConfigMap's flagfile (and in the container args) is one
#   `vdm-server --helpfull` lists, and vdm-server's own parser accepts the
#   whole flagfile (it gets as far as loading the model);
# - the gRPC and metrics ports of --address/--metrics_address are the
#   containerPorts, the gRPC probes' port, the prometheus.io/port annotation
#   and the Services' target ports; the ServiceMonitor scrapes one Service;
# - terminationGracePeriodSeconds and the liveness window exceed preStop +
#   --drain_seconds; --threads equals the CPU request; gpu asks for GPUs;
# - the metric names the HPA, adapter and alert rules use exist in
#   server/metrics.cc.
set -euo pipefail
server=${1:?usage: check_manifests.sh VDM_SERVER REPO_ROOT}
repo=${2:?usage: check_manifests.sh VDM_SERVER REPO_ROOT}
fail() { echo "FAILED: $*" >&2; exit 1; }
command -v kubectl >/dev/null || fail "kubectl is not on PATH (see lint_and_render.sh)"
python=/usr/bin/python3
"$python" -c 'import yaml' 2>/dev/null ||
  fail "$python cannot import yaml (python3-yaml comes with yamllint: run scripts/install-deps.sh)"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# absl exits 1 after printing --helpfull; what matters is the text.
"$server" --helpfull >"$out/helpfull.txt" 2>&1 || true
grep -q -- '--address' "$out/helpfull.txt" || { cat "$out/helpfull.txt"; fail "vdm-server --helpfull"; }

rendered=()
for dir in "$repo"/deploy/overlays/*/; do
  name=$(basename "$dir")
  kubectl kustomize "$dir" >"$out/$name.yaml" || fail "kubectl kustomize $dir"
  rendered+=("$name=$out/$name.yaml")
  # vdm-server's own flag parser on the ConfigMap's flagfile: with a model
  # that does not exist, no metrics port and the CPU (later flags override
  # the flagfile's), a flagfile it accepts ends in a model-loading error; a
  # bad flag name or value ends in a flag error.
  "$python" - "$out/$name.yaml" "$out/$name.flags" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
cm = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("vdm-server-flags")]
open(sys.argv[2], "w").write(cm[0]["data"]["server.flags"])
PY
  set +e
  "$server" --flagfile="$out/$name.flags" --model="$out/no-such-model.pt" \
    --metrics_address= --address=127.0.0.1:0 --devices=cpu >"$out/$name.log" 2>&1
  rc=$?
  set -e
  if [ "$rc" -ne 1 ] || ! grep -q "no-such-model.pt" "$out/$name.log" ||
     grep -qiE "unknown command line flag|illegal value|flagfile" "$out/$name.log"; then
    cat "$out/$name.log" >&2
    fail "overlay $name: vdm-server does not accept the ConfigMap's flagfile (exit $rc)"
  fi
  echo "ok      [$name] vdm-server parses the ConfigMap's flagfile (stops at loading the model)"
done

"$python" "$repo/tests/deploy/check_manifests.py" --helpfull="$out/helpfull.txt" \
  --metrics_cc="$repo/server/metrics.cc" --prometheus_dir="$repo/deploy/prometheus" \
  "${rendered[@]}"
