#!/usr/bin/env python3
"""Seeded results under every ATen kernel set this CPU has, compared.

libtorch picks its CPU kernels at start-up (ATEN_CPU_CAPABILITY: default =
no vectorization, avx2, avx512), and rounding follows the kernels. The
README promises that a seed reproduces sampled images and scores; this check
runs vdm-seeded-results (tests/portability/seeded_results.cc) once with the
variable unset (the reference: what this CPU picks by itself) and once under
each capability, for two models: a gentle tiny test model (tiny_smooth.pt:
samples, ELBO and ODE scores) and the shipped model (samples and ELBO; its
ODE would take minutes here), and asserts that every result agrees with the reference
within the tolerances below. A capability the CPU lacks is reported as not
run, never as passed: the CPU's flags (/proc/cpuinfo) decide it before the
run, because this libtorch does not fall back under a forced capability but
dies of an illegal instruction (SIGILL, seen on an AMD EPYC without
AVX-512); a run that falls back anyway (the tool reports the kernels it
got) is not run either.

Tolerances (docs/performance.md, "What a seed reproduces"):
- samples (uint8 pixels): at most 10% of the pixels differ at all, and none
  by more than 4 grey levels: the same trajectories, with last-bit
  differences (in eps_hat, and in the normal draws, which libtorch computes
  with vectorized kernels too) that move a pixel across a rounding boundary
  (measured on the shipped model: at most 4.4% of the pixels, by at most 2
  levels, DDPM-20 under no vectorization against AVX2);
- ELBO and ODE bpd: within 1% of the image's own reported standard error
  (plus 1e-6 bits/dim), i.e. far below the estimator's noise: a change that
  large would be a different estimate, not rounding.

  /usr/bin/python3 tests/portability/check_portability.py \
      --tool=build/tests/vdm-seeded-results --model=build/tests/models/tiny.pt
"""

import argparse
import json
import os
import subprocess
import sys

CAPABILITIES = ("default", "avx2", "avx512")
# How at::show_config() names each of them.
NAMES = {"NO AVX": "default", "AVX2": "avx2", "AVX512": "avx512"}
# The CPU flags each capability's kernels need (ATen's cpu/vec: AVX-512
# F/BW/VL/DQ; AVX2 with FMA).
NEEDS = {"default": set(), "avx2": {"avx2", "fma"},
         "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}
PIXEL_FRACTION = 0.10
PIXEL_LEVELS = 4
SE_FRACTION = 0.01
ABS_BPD = 1e-6


def cpu_flags():
    """The flags of the first processor in /proc/cpuinfo; None where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def run(tool, model, capability, ode=True):
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    command = [tool, f"--model={model}"] + ([] if ode else ["--ode_steps=0"])
    done = subprocess.run(command, env=env,
                          capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        sys.exit(f"portability: {tool} under ATEN_CPU_CAPABILITY="
                 f"{capability}: exit {done.returncode}\n{done.stderr}")
    return json.loads(done.stdout)


def compare(ref, got):
    """Failures (strings) of `got` against `ref`, and a summary line."""
    failures, worst = [], {}
    for name, want in ref["samples"].items():
        have = got["samples"][name]
        diffs = [abs(a - b) for a, b in zip(want, have)]
        changed = sum(d > 0 for d in diffs) / len(diffs)
        worst[f"samples {name}"] = (f"{100 * changed:.2f}% pixels differ, "
                                    f"max {max(diffs):.0f} levels")
        if changed > PIXEL_FRACTION or max(diffs) > PIXEL_LEVELS:
            failures.append(f"samples {name}: {worst[f'samples {name}']}")
    for method in ("elbo", "ode")[:len(ref) - 2]:
        ratios = []
        for i, (a, b, se) in enumerate(zip(ref[method]["bpd"],
                                           got[method]["bpd"],
                                           ref[method]["stderr_bpd"])):
            limit = SE_FRACTION * se + ABS_BPD
            ratios.append(abs(a - b) / se)
            if not abs(a - b) <= limit:
                failures.append(f"{method} image {i}: bpd {b!r} vs {a!r} "
                                f"(|diff| {abs(a - b):.3g} > {limit:.3g})")
        worst[method] = f"max |diff| = {max(ratios):.2g} standard errors"
    return failures, worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tool", required=True)
    parser.add_argument("--model", required=True,
                        help="a model checked with ODE scores")
    parser.add_argument("--shipped", default="",
                        help="a model checked without ODE scores")
    args = parser.parse_args()
    models = [(args.model, True)] + ([(args.shipped, False)]
                                     if args.shipped else [])
    ran, failed = 0, []
    flags = cpu_flags()
    for model, ode in models:
        name = os.path.basename(model)
        ref = run(args.tool, model, None, ode)
        print(f"portability: {name}: this CPU picks {ref['cpu_capability']} "
              f"by itself (the reference)")
        for cap in CAPABILITIES:
            if NAMES.get(ref["cpu_capability"]) == cap:
                # The reference ran these kernels already: the same process
                # again would only repeat it.
                ran += 1
                print(f"portability: {name}: {cap}: the reference itself")
                continue
            missing = sorted(NEEDS[cap] - flags) if flags is not None else []
            if missing:
                print(f"portability: {name}: {cap}: NOT RUN (this CPU lacks "
                      f"{', '.join(missing)})")
                continue
            got = run(args.tool, model, cap, ode)
            if NAMES[got["cpu_capability"]] != cap:
                print(f"portability: {name}: {cap}: NOT RUN (this CPU lacks "
                      f"it; libtorch ran {got['cpu_capability']})")
                continue
            ran += 1
            failures, worst = compare(ref, got)
            for key, text in worst.items():
                print(f"portability: {name}: {cap}: {key}: {text}")
            failed += [f"{name} {cap}: {f}" for f in failures]
    for f in failed:
        print(f"portability: FAIL {f}")
    # default and avx2 exist on every x86-64 CPU libtorch's AVX2 build runs on.
    if ran < 2 * len(models):
        sys.exit(f"portability: only {ran} runs of kernel sets")
    bad = len({f.split(":")[0] for f in failed})
    print(f"portability: {ran - bad} of {ran} (model, kernel set) runs agree "
          f"with the reference")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
