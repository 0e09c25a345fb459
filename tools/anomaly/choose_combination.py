"""Which rule combines the thorough level's group z's (docs/anomaly.md, "Choosing the
combination"), chosen on one half of vdm-ood-eval's images and reported on the other.

  build/vdm-ood-eval ... --scores_out=scores.json
  /usr/bin/python3 tools/anomaly/choose_combination.py scores.json

The rules are a small family declared before looking (Fisher's sum, Tippett's maximum, and
Fisher's sum over fewer groups or with the two neighbour groups, knn and local, first joined by
Stouffer's sum). Images are split by index parity: the even ones (in-distribution and every set)
choose the rule by the mean AUROC over the sets, the odd ones report it.
"""

import json
import math
import sys

GROUPS = ["fast", "knn", "recon_error", "recon_distance", "local"]


def log_tail(z: float) -> float:
    """log Phi(-z), accurate far out."""
    if z < 30:
        return math.log(max(0.5 * math.erfc(z / math.sqrt(2)), 1e-300))
    return -0.5 * z * z - math.log(z) - 0.5 * math.log(2 * math.pi)


def fisher(zs):
    return sum(-2 * log_tail(z) for z in zs)


def near(z):
    return (z["knn"] + z["local"]) / math.sqrt(2)


RULES = {
    "fisher (5 groups)": lambda z: fisher([z[g] for g in GROUPS]),
    "tippett (5 groups)": lambda z: max(z[g] for g in GROUPS),
    "fisher without recon_distance": lambda z: fisher([z[g] for g in GROUPS if g != "recon_distance"]),
    "fisher over fast, knn, local": lambda z: fisher([z["fast"], z["knn"], z["local"]]),
    "fisher over fast, recon_error, stouffer(knn, local)":
        lambda z: fisher([z["fast"], z["recon_error"], near(z)]),
    "fisher over fast, stouffer(knn, local)": lambda z: fisher([z["fast"], near(z)]),
}


def auroc(pos, neg):
    pairs = sorted([(v, 1) for v in pos] + [(v, 0) for v in neg])
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        rank_sum += sum(0.5 * (i + 1 + j) for t in range(i, j) if pairs[t][1])
        i = j
    n_pos, n_neg = len(pos), len(neg)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def scores_of(block, rule, parity):
    n = len(block["z knn"])
    out = []
    for i in range(parity, n, 2):
        z = {g: block["z " + g][i] for g in GROUPS}
        z = {g: (1e3 if v is None or math.isnan(v) else v) for g, v in z.items()}
        out.append(rule(z))
    return out


def main() -> int:
    data = json.load(open(sys.argv[1]))
    ind = data.pop("in-distribution")
    sets = sorted(data)
    table = {}
    for name, rule in RULES.items():
        for parity in (0, 1):
            neg = scores_of(ind, rule, parity)
            table[(name, parity)] = {s: auroc(scores_of(data[s], rule, parity), neg) for s in sets}
    for s in sets:  # the baseline, per half
        for parity in (0, 1):
            table.setdefault(("feature kNN", parity), {})[s] = auroc(
                data[s]["feature kNN"][parity::2], ind["feature kNN"][parity::2])
    chosen = max(RULES, key=lambda r: sum(table[(r, 0)].values()))
    print("| rule | half | " + " | ".join(sets) + " | mean |")
    print("|---|---|" + "---|" * (len(sets) + 1))
    for name in list(RULES) + ["feature kNN"]:
        for parity, half in ((0, "choose"), (1, "report")):
            row = table[(name, parity)]
            print("| %s | %s | %s | %.3f |" % (name, half, " | ".join("%.3f" % row[s] for s in sets),
                                               sum(row.values()) / len(sets)))
    print("\nchosen on the even half: %s" % chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
