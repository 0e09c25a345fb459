#!/usr/bin/python3
"""Checks rendered Kubernetes manifests against what vdm-server accepts.

  /usr/bin/python3 check_manifests.py --helpfull=FILE --metrics_cc=FILE
      --prometheus_dir=DIR OVERLAY=RENDERED.yaml ...

FILE given to --helpfull is the output of `vdm-server --helpfull`. Each
OVERLAY=RENDERED.yaml is the output of `kubectl kustomize deploy/overlays/OVERLAY`.
Prints one line per check and exits 1 if any failed. Run by check_manifests.sh;
needs PyYAML (python3-yaml, which yamllint depends on).
"""

import argparse
import glob
import os
import re
import sys

import yaml

FAILURES = []


def check(ok, what):
    print(("ok      " if ok else "FAILED  ") + what)
    if not ok:
        FAILURES.append(what)
    return ok


def parse_helpfull(text):
    """Returns {flag: default string} for every flag `--helpfull` lists."""
    flags = {}
    blocks = re.split(r"\n\s+(?=--\w+ \()", "\n" + text)
    for block in blocks:
        m = re.match(r"--(\w+) \(", block)
        if not m:
            continue
        d = re.search(r"default: (.*?);\s*$", block, re.S)
        default = d.group(1).strip() if d else ""
        if default.startswith('"') and default.endswith('"'):
            default = default[1:-1]
        flags[m.group(1)] = default
    return flags


def parse_flagfile(text):
    """Returns [(name, value)] of the --name=value lines of an Abseil flagfile."""
    flags = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"--(\w+)(?:=(.*))?$", line)
        if not m:
            flags.append((None, line))
            continue
        flags.append((m.group(1), m.group(2) if m.group(2) is not None else "true"))
    return flags


def port_of(address):
    return int(address.rsplit(":", 1)[1])


def one(docs, kind, name_prefix):
    found = [d for d in docs if d.get("kind") == kind and
             d["metadata"]["name"].startswith(name_prefix)]
    return found


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def cpu_cores(quantity):
    q = str(quantity)
    if q.endswith("m"):
        return int(q[:-1]) / 1000.0
    return float(q)


def check_overlay(overlay, docs, helpfull):
    print(f"--- overlay {overlay}")
    p = f"[{overlay}] "
    deployments = one(docs, "Deployment", "vdm-server")
    if not check(len(deployments) == 1, p + "one Deployment vdm-server"):
        return
    dep = deployments[0]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    spec = pod["spec"]
    containers = [c for c in spec["containers"] if c["name"] == "vdm-server"]
    if not check(len(containers) == 1, p + "container vdm-server"):
        return
    c = containers[0]

    # The flags: --flagfile pointing into the mounted ConfigMap.
    cms = one(docs, "ConfigMap", "vdm-server-flags")
    if not check(len(cms) == 1, p + "one ConfigMap vdm-server-flags-*"):
        return
    cm = cms[0]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts", [])}
    flags = []
    for arg in c.get("args", []):
        m = re.match(r"--(\w+)(?:=(.*))?$", arg)
        if not check(m is not None, p + f"container arg {arg!r} has the form --name=value"):
            continue
        name, value = m.group(1), m.group(2)
        if name != "flagfile":
            flags.append((name, value, "args"))
            continue
        directory, key = os.path.split(value)
        mount = mounts.get(directory)
        volume = volumes.get(mount["name"]) if mount else None
        ok = (volume is not None and "configMap" in volume and
              volume["configMap"]["name"] == cm["metadata"]["name"] and
              key in cm.get("data", {}))
        if check(ok, p + f"--flagfile={value} is key {key!r} of the mounted ConfigMap "
                 f"{cm['metadata']['name']}"):
            flags += [(n, v, "ConfigMap") for n, v in parse_flagfile(cm["data"][key])]
    for name, value, where in flags:
        check(name is not None and name in helpfull,
              p + f"{where} flag --{name}={value} is one vdm-server --helpfull lists")
    values = {n: v for n, v, _ in flags if n}
    def flag(name):
        return values.get(name, helpfull.get(name, ""))

    # Ports: flags <-> containerPorts <-> probes <-> annotations <-> Services.
    ports = {cp["name"]: cp["containerPort"] for cp in c.get("ports", [])}
    grpc_port = port_of(flag("address"))
    metrics_port = port_of(flag("metrics_address"))
    check(ports.get("grpc") == grpc_port,
          p + f"containerPort grpc ({ports.get('grpc')}) is --address's port ({grpc_port})")
    check(ports.get("metrics") == metrics_port,
          p + f"containerPort metrics ({ports.get('metrics')}) is --metrics_address's port "
          f"({metrics_port})")
    # Probes: HTTP on the metrics port; readiness and start-up ask /readyz
    # (ready = loaded, warmed up, not draining), liveness asks /livez.
    want_path = {"startupProbe": "/readyz", "readinessProbe": "/readyz",
                 "livenessProbe": "/livez"}
    for probe, path in want_path.items():
        pr = c.get(probe)
        if not check(pr is not None and "httpGet" in pr, p + f"{probe} is an HTTP probe"):
            continue
        port = pr["httpGet"].get("port")
        check(port in ("metrics", metrics_port),
              p + f"{probe} port {port} is the metrics port ({metrics_port})")
        check(pr["httpGet"].get("path") == path, p + f"{probe} path is {path}")
    check(flag("metrics_address") != "",
          p + "--metrics_address is set (the probes are served there)")
    ann = pod["metadata"].get("annotations", {})
    check(ann.get("prometheus.io/scrape") == "true", p + "pod annotation prometheus.io/scrape")
    check(ann.get("prometheus.io/port") == str(metrics_port),
          p + f"pod annotation prometheus.io/port is {metrics_port}")
    check(ann.get("prometheus.io/path") == "/metrics", p + "pod annotation prometheus.io/path")

    services = one(docs, "Service", "vdm-")
    names = sorted(s["metadata"]["name"] for s in services)
    check(names == ["vdm-headless", "vdm-server"], p + f"Services vdm-server and vdm-headless ({names})")
    for svc in services:
        s = svc["spec"]
        sp = f"{p}Service {svc['metadata']['name']}: "
        check(labels_match(s["selector"], pod_labels), sp + "selector matches the pod labels")
        for port in s["ports"]:
            target = port.get("targetPort", port["port"])
            number = ports.get(target) if isinstance(target, str) else target
            check(number == ports.get(port["name"]),
                  sp + f"port {port['name']} targets containerPort {ports.get(port['name'])}")
        check("grpc" in [x["name"] for x in s["ports"]], sp + "has a grpc port")
        if svc["metadata"]["name"] == "vdm-headless":
            check(s.get("clusterIP") == "None", sp + "is headless (clusterIP: None)")
        else:
            check("metrics" in [x["name"] for x in s["ports"]], sp + "has a metrics port")

    monitors = one(docs, "ServiceMonitor", "vdm-server")
    if check(len(monitors) == 1, p + "one ServiceMonitor"):
        sm = monitors[0]["spec"]
        chosen = [x for x in services
                  if labels_match(sm["selector"]["matchLabels"], x["metadata"].get("labels", {}))]
        check([x["metadata"]["name"] for x in chosen] == ["vdm-server"],
              p + "ServiceMonitor selects exactly the Service vdm-server (no double scrape)")
        for ep in sm["endpoints"]:
            check(ep.get("port") in [x["name"] for x in chosen[0]["spec"]["ports"]] if chosen else False,
                  p + f"ServiceMonitor endpoint port {ep.get('port')!r} is a Service port")
            check(ep.get("path", "/metrics") == "/metrics", p + "ServiceMonitor path /metrics")

    # Shutdown: preStop sleep + drain fits in the grace period; liveness
    # never restarts a draining pod.
    drain = int(flag("drain_seconds"))
    sleep = 0
    pre = c.get("lifecycle", {}).get("preStop", {})
    cmd = pre.get("exec", {}).get("command", [])
    if len(cmd) == 2 and cmd[0] == "sleep":
        sleep = int(cmd[1])
    elif "sleep" in pre:
        sleep = int(pre["sleep"]["seconds"])
    grace = int(spec.get("terminationGracePeriodSeconds", 30))
    check(grace > drain + sleep,
          p + f"terminationGracePeriodSeconds {grace} > preStop {sleep} s + --drain_seconds {drain}")
    live = c["livenessProbe"]
    window = live.get("periodSeconds", 10) * live.get("failureThreshold", 3)
    check(window > drain + sleep,
          p + f"liveness failure window {window} s > preStop + drain ({drain + sleep} s)")
    start = c["startupProbe"]
    check(start.get("periodSeconds", 10) * start.get("failureThreshold", 3) >= 60,
          p + "startupProbe allows at least 60 s for model load and warm-up")

    # Threads: --threads per CPU replica, times the CPU replicas (or once for
    # GPU workers), is the CPU request, and OpenMP/OpenBLAS agree with it.
    res = c.get("resources", {})
    threads = int(flag("threads"))
    devices = flag("devices")
    check(devices != "auto", p + "--devices is explicit (auto would size by the node's cores: "
          "a CPU request sets no cgroup quota)")
    cpu_replicas = len([d for d in devices.split(",") if d == "cpu"])
    cpu = cpu_cores(res.get("requests", {}).get("cpu", 0))
    check(threads * max(1, cpu_replicas) == cpu,
          p + f"--threads={threads} x {max(1, cpu_replicas)} replica(s) equals the CPU request "
          f"({cpu} cores)")
    lone = int(flag("lone_threads") or -1)
    check(lone != -1 and lone <= cpu,
          p + f"--lone_threads={lone} is explicit and at most the CPU request ({cpu} cores;"
          " -1 would count the node's cores without a CPU quota)")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        check(env.get(var) == str(threads), p + f"{var}={env.get(var)} equals --threads")
    check("memory" in res.get("limits", {}), p + "a memory limit is set")

    # A model repository is a mounted volume, read-only, polled.
    repository = flag("model_repository").rstrip("/")
    if repository:
        mount = mounts.get(repository)
        volume = volumes.get(mount["name"]) if mount else None
        check(volume is not None,
              p + f"--model_repository={repository} is a volumeMount of the container")
        if volume is not None:
            check(mount.get("readOnly") is True, p + f"{repository} is mounted read-only")
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            claims = [d["metadata"]["name"] for d in docs
                      if d.get("kind") == "PersistentVolumeClaim"]
            check(claim is None or claim in claims,
                  p + f"the repository's claim {claim!r} is one the overlay creates ({claims})")
        check(int(flag("repository_poll_seconds") or 0) > 0,
              p + "--repository_poll_seconds > 0 (new versions roll out in place)")

    # Devices and GPUs.
    gpus = int(res.get("limits", {}).get("nvidia.com/gpu", 0))
    if overlay == "gpu":
        check(gpus >= 1, p + "nvidia.com/gpu limit requested")
        check(len([d for d in devices.split(",") if d.startswith("cuda")]) == gpus,
              p + f"--devices={devices} names one cuda device per requested GPU ({gpus})")
    else:
        check(gpus == 0 and cpu_replicas == len(devices.split(",")),
              p + f"no GPU and --devices={devices} (CPU replicas only)")

    # Who else points at the pods.
    for kind in ("PodDisruptionBudget",):
        objs = one(docs, kind, "vdm-server")
        if check(len(objs) == 1, p + f"one {kind}"):
            check(labels_match(objs[0]["spec"]["selector"]["matchLabels"], pod_labels),
                  p + f"{kind} selector matches the pod labels")
    hpas = one(docs, "HorizontalPodAutoscaler", "vdm-server")
    if check(len(hpas) == 1, p + "one HorizontalPodAutoscaler"):
        h = hpas[0]["spec"]
        check(h["scaleTargetRef"]["kind"] == "Deployment" and
              h["scaleTargetRef"]["name"] == dep["metadata"]["name"],
              p + "HPA scales the Deployment")
        check(any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in h["metrics"]),
              p + "HPA has a CPU metric")
        check(h.get("minReplicas", 1) >= 2, p + "HPA keeps at least 2 replicas (the PDB can then "
              "always evict one)")
        check("replicas" not in dep["spec"], p + "Deployment leaves replicas to the HPA")
        return [m["pods"]["metric"]["name"] for m in h["metrics"] if m["type"] == "Pods"]
    return []


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--helpfull", required=True)
    parser.add_argument("--metrics_cc", required=True)
    parser.add_argument("--prometheus_dir", required=True)
    parser.add_argument("rendered", nargs="+")
    args = parser.parse_args()

    with open(args.helpfull) as f:
        helpfull = parse_helpfull(f.read())
    if not check(len(helpfull) >= 10 and "address" in helpfull and "flagfile" in helpfull,
                 f"vdm-server --helpfull lists {len(helpfull)} flags, --address and --flagfile "
                 "among them"):
        return 1
    with open(args.metrics_cc) as f:
        metric_names = set(re.findall(r'\.Name\("(vdm_\w+)"\)', f.read()))
    check(len(metric_names) >= 5, f"server/metrics.cc defines {len(metric_names)} vdm_* metrics")

    used = {}
    overlays = []
    for item in args.rendered:
        overlay, path = item.split("=", 1)
        overlays.append(overlay)
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for name in check_overlay(overlay, docs, helpfull) or []:
            used.setdefault(name, f"HPA of overlay {overlay}")
    check("cpu" in overlays and "gpu" in overlays, "overlays cpu and gpu were both checked")

    # Metric names in the HPA, the adapter rules and the alert rules exist.
    print("--- metric names")
    for path in sorted(glob.glob(os.path.join(args.prometheus_dir, "*.yaml"))):
        with open(path) as f:
            text = f.read()
        for name in re.findall(r"\b(vdm_\w+)", text):
            used.setdefault(name, os.path.basename(path))
    # Names prometheus-adapter publishes under a new name ("as:") are derived
    # series: the HPA may use them, the server need not define them.
    with open(os.path.join(args.prometheus_dir, "adapter-values.yaml")) as f:
        adapter = yaml.safe_load(f)
    derived = {r["name"]["as"]: r for r in adapter["rules"]["custom"]}
    check(len(used) >= 3, f"{len(used)} vdm_* metric names are used by the manifests")
    for name, where in sorted(used.items()):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if base in derived and base not in metric_names:
            query = derived[base]["seriesQuery"] + derived[base]["metricsQuery"]
            sources = set(re.findall(r"\b(vdm_\w+)", query)) - {base}
            check(sources and all(s in metric_names for s in sources),
                  f"{where}: {name} is derived by the adapter from {sorted(sources)}, "
                  "metrics server/metrics.cc defines")
            continue
        check(base in metric_names, f"{where}: {name} is a metric server/metrics.cc defines")

    with open(os.path.join(args.prometheus_dir, "alert-rules.yaml")) as f:
        rules = yaml.safe_load(f)
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    exprs = " ".join(r["expr"] for r in alerts)
    check(all("expr" in r and "for" in r and "severity" in r.get("labels", {}) for r in alerts),
          f"{len(alerts)} alert rules, each with expr, for and severity")
    check("vdm_requests_total" in exprs and "code" in exprs, "an alert on the error rate by code")
    check("vdm_queued_rows" in exprs and "RESOURCE_EXHAUSTED" in exprs,
          "alerts on queue saturation (vdm_queued_rows backlog and RESOURCE_EXHAUSTED)")

    print(f"{len(FAILURES)} check(s) failed" if FAILURES else "all manifest checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
