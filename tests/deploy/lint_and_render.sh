#!/usr/bin/env bash
# Deploy check 1: yamllint passes on every manifest under deploy/ (with the
# repository's .yamllint), and `kubectl kustomize` renders every overlay.
#   bash tests/deploy/lint_and_render.sh REPO_ROOT
# kubectl (with its built-in kustomize) comes with the machine image, not from
# install-deps.sh: Debian 12's kubernetes-client is kubectl 1.20.2, whose
# kustomize v2.0.3 cannot render these overlays (no directories under
# resources:, no labels:, components: or patches: with a target). The image's
# kubectl 1.32 (kustomize v5.5) does; kubectl 1.27 or later (kustomize v5)
# should. A missing or too old kubectl is a failure, not a skip.
set -euo pipefail
repo=${1:?usage: lint_and_render.sh REPO_ROOT}
cd "$repo"
fail() { echo "FAILED: $*" >&2; exit 1; }

command -v yamllint >/dev/null ||
  fail "yamllint is not installed (scripts/install-deps.sh installs it)"
command -v kubectl >/dev/null ||
  fail "kubectl is not on PATH; it is needed to render the kustomize overlays." \
       "The machine image provides it (kubectl 1.32, kustomize v5.5 here). Debian 12's" \
       "kubernetes-client (kubectl 1.20.2, kustomize v2.0.3) is too old to render them," \
       "so install-deps.sh does not install it: install a kubectl 1.27 or later."

mapfile -t manifests < <(find deploy -name '*.yaml' -o -name '*.yml' | sort)
[ "${#manifests[@]}" -ge 10 ] || fail "expected the manifests under deploy/, found ${#manifests[@]}"
echo "yamllint: ${#manifests[@]} files"
yamllint --strict -c .yamllint .yamllint "${manifests[@]}" || fail "yamllint found problems"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
overlays=(deploy/overlays/*/)
[ "${#overlays[@]}" -ge 2 ] || fail "expected overlays cpu and gpu under deploy/overlays"
for dir in "${overlays[@]}"; do
  name=$(basename "$dir")
  kubectl kustomize "$dir" >"$out/$name.yaml" 2>"$out/$name.err" ||
    { cat "$out/$name.err" >&2
      fail "kubectl kustomize $dir (with $(command -v kubectl):" \
           "$(kubectl version --client 2>&1 | head -1); the overlays need a kustomize v5" \
           "(kubectl 1.27 or later, tested with 1.32); Debian 12's kubectl 1.20.2 cannot)"; }
  kinds=$(grep -E '^kind: ' "$out/$name.yaml" | sort | uniq -c | awk '{printf "%s x%s, ", $3, $1}')
  echo "kustomize $name: ${kinds%, }"
  for kind in ConfigMap Deployment HorizontalPodAutoscaler PodDisruptionBudget Service ServiceMonitor; do
    grep -qx "kind: $kind" "$out/$name.yaml" || fail "overlay $name renders no $kind"
  done
  [ "$(grep -cx 'kind: Service' "$out/$name.yaml")" -eq 2 ] ||
    fail "overlay $name: expected 2 Services (vdm-server and vdm-headless)"
done
echo "lint_and_render: all passed"
