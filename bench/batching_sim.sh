#!/usr/bin/env bash
# Runs vdm-batching-sim on both cost models and draws latency against offered
# load per policy (docs/performance.md, "Continuous batching against
# request-level batching").
# Usage: bench/batching_sim.sh [OUT_DIR] [vdm-batching-sim flags]
#   OUT_DIR (default /tmp/batching_sim) gets report.md and batching_sim.csv;
#   the picture goes to docs/images/batching_sim.png.
# Needs build/vdm-batching-sim (scripts/build.sh --target vdm-batching-sim)
# and /usr/bin/python3 with matplotlib (Debian: python3-matplotlib).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/batching_sim}
shift || true
mkdir -p "$out"
start=$(date +%s)
build/vdm-batching-sim --csv="$out/batching_sim.csv" "$@" | tee "$out/report.md"
echo "batching_sim: simulated in $(( $(date +%s) - start )) s" >&2
/usr/bin/python3 - "$out/batching_sim.csv" docs/images/batching_sim.png <<'PY'
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = list(csv.DictReader(open(sys.argv[1])))
models = [m for m in ("GPU-like", "CPU-like") if any(r["model"] == m for r in rows)]
kinds = [("ddim10", "DDIM-10"), ("ddpm250", "DDPM-250")]
colors = {"one-at-a-time": "tab:gray", "request-level": "tab:orange",
          "continuous": "tab:blue"}
fig, axes = plt.subplots(len(models), len(kinds), figsize=(10, 4 * len(models)),
                         squeeze=False)
for i, model in enumerate(models):
    for j, (key, label) in enumerate(kinds):
        ax = axes[i][j]
        slo = None
        for policy, color in colors.items():
            pts = [(float(r["load"]), float(r[key + "_p99"])) for r in rows
                   if r["model"] == model and r["policy"] == policy]
            if not pts:
                continue
            slo = float(next(r[key + "_slo"] for r in rows if r["model"] == model))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color,
                    label=policy, markersize=3)
        if slo is not None:
            ax.axhline(slo, color="red", linestyle="--", linewidth=1,
                       label="objective (10x alone)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel(label + " p99 latency (s)")
        ax.set_title(f"{model}: {label} p99")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
fig.suptitle("vdm-batching-sim: real engine, simulated a + b*rows forward cost")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=90)
print("wrote", sys.argv[2])
PY
