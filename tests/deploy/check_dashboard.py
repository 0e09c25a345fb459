#!/usr/bin/env python3
"""Checks the Grafana dashboard against the metrics vdm-server really exports.

  python3 check_dashboard.py VDM_SERVER MODEL.pt REPO_ROOT [DASHBOARD.json]

Loads deploy/grafana/vdm-serve.json (or DASHBOARD.json), collects every PromQL
expression in it (targets[].expr of every panel, recursively through rows and
nested panels, and the templating variables' queries), extracts every metric
name those expressions use, and fails naming each one that vdm-server does not
export.

The exported names come from the server itself: the check starts VDM_SERVER
with MODEL.pt on a free loopback metrics port, waits until it is ready, scrapes
/metrics, and reads its `# TYPE name type` lines (a histogram X stands for
X_bucket, X_sum and X_count; a summary X for X, X_sum and X_count). It sends
the server no request. prometheus-cpp (Debian's 1.0) leaves a family with
labels out of the scrape, HELP and TYPE lines included, until its first child
exists: the warm-up touches the worker and queue metrics, but the per-method
and per-reason families (vdm_requests_total, vdm_request_latency_seconds,
vdm_requests_stopped_total) only appear after a real call. For those, and only
for families missing from the scrape, the check falls back to the
Build*().Name("...") calls in server/metrics.cc, and says which names it took
from there.

Standard library only; exits 1 on any failure.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

READY_TIMEOUT_S = 60  # model load + warm-up of the tiny test model takes < 1 s
STOP_TIMEOUT_S = 30

# PromQL functions (Prometheus 2.x / 3.x), aggregation operators and keywords:
# identifiers that are never metric names.
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh",
    "atan", "atanh", "avg_over_time", "ceil", "changes", "clamp", "clamp_max",
    "clamp_min", "cos", "cosh", "count_over_time", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv",
    "double_exponential_smoothing", "exp", "floor", "histogram_avg",
    "histogram_count", "histogram_fraction", "histogram_quantile",
    "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters",
    "hour", "idelta", "increase", "info", "irate", "label_join",
    "label_replace", "last_over_time", "ln", "log10", "log2",
    "mad_over_time", "max_over_time", "min_over_time", "minute", "month",
    "pi", "predict_linear", "present_over_time", "quantile_over_time", "rad",
    "rate", "resets", "round", "scalar", "sgn", "sin", "sinh", "sort",
    "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt",
    "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh",
    "time", "timestamp", "vector", "year",
}
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
    "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}
KEYWORDS = {
    "and", "or", "unless", "atan2", "by", "without", "on", "ignoring",
    "group_left", "group_right", "offset", "bool", "inf", "nan", "start",
    "end", "step",
}
# Grafana's Prometheus variable query functions (templating).
GRAFANA_QUERY_FUNCTIONS = {"label_values", "label_names", "metrics",
                           "query_result"}

FAILURES = []


def check(ok, what):
    print(("ok      " if ok else "FAILED  ") + what)
    if not ok:
        FAILURES.append(what)
    return ok


# --------------------------------------------------------------- PromQL names

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+(?::\w+)?\]\]")
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"([^"]*)"')
_BRACES = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_TOKEN = re.compile(
    r"(?P<num>0[xX][0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
    r"(?:ms|[smhdwy])?(?:\d+(?:ms|[smhdwy]))*)"
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)"
    r"|(?P<other>.)", re.S)


def metric_names(expr):
    """Returns (metric names, unknown functions) used by one PromQL expression.

    Strips comments, Grafana variables, label matchers ({...}, keeping a
    literal __name__="..." matcher as a name), ranges and subqueries
    ([5m], [30m:1m]), label lists (by/without/on/ignoring/group_left/
    group_right (...)) and string literals; every identifier left that is not
    a function, aggregation operator or keyword is a metric name. An
    identifier followed by "(" that is no known function is reported apart.
    """
    names, unknown = set(), set()
    # Strings first (they may hold braces, brackets or '#'), but keep the
    # __name__ matchers' values; then comments.
    for m in _NAME_MATCHER.finditer(expr):
        names.add(m.group(1))
    text = _STRING.sub('""', expr)
    text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    text = _GRAFANA_VAR.sub(" ", text)
    text = _BRACES.sub(" ", text)
    while True:  # nested subqueries: rate(x[1m])[30m:1m]
        stripped = _RANGE.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    text = _LABEL_LIST.sub(r" \1 ", text)
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(text)
              if not m.group().isspace()]
    for i, (kind, value) in enumerate(tokens):
        if kind != "ident":
            continue
        called = i + 1 < len(tokens) and tokens[i + 1][1] == "("
        lower = value.lower()
        if lower in KEYWORDS or (called and (value in FUNCTIONS or lower in AGGREGATIONS)):
            continue
        if lower in AGGREGATIONS and i + 1 < len(tokens) and tokens[i + 1][1] in ("by", "without"):
            continue  # sum by (x) (...): the label list is already gone
        if called:
            unknown.add(value)
        else:
            names.add(value)
    return names, unknown


def variable_query_exprs(query):
    """The PromQL inside one Grafana Prometheus variable query, or None."""
    if isinstance(query, dict):
        query = query.get("query", "")
    query = (query or "").strip()
    m = re.fullmatch(r"label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)", query, re.S)
    if m:
        return m.group(1)
    if re.fullmatch(r"label_values\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\)", query):
        return None
    m = re.fullmatch(r"query_result\((.*)\)", query, re.S)
    if m:
        return m.group(1)
    if re.fullmatch(r"(label_names|metrics)\(.*\)", query, re.S) or not query:
        return None
    return query


def self_test():
    """The name extraction on expressions whose answer is known."""
    cases = [
        ('sum by (method, code) (rate(vdm_requests_total{job="x", code!="OK"}[5m]))',
         {"vdm_requests_total"}),
        ("histogram_quantile(0.99, sum by (method, le) "
         "(rate(vdm_request_latency_seconds_bucket{pod=~\"$pod\"}[$__rate_interval])))",
         {"vdm_request_latency_seconds_bucket"}),
        ("sum(rate(a_sum[1h] offset 1w)) / sum without (instance) (rate(a_count[1h]))",
         {"a_sum", "a_count"}),
        ("clamp_min(max_over_time(rate(x_total{a=\"{b}\"}[1m])[30m:1m]), 1) > bool 0.5e3",
         {"x_total"}),
        ("a * on (pod) group_left (node) b or c unless d and e",
         {"a", "b", "c", "d", "e"}),
        ("sum(x) by (le) + count(y) without (z) - topk(5, w) @ start()",
         {"x", "y", "w"}),
        ('{__name__="by_name", job="j"} + label_replace(v, "dst", "$1", "src", "(.*)")',
         {"by_name", "v"}),
        ("rate(x[5m] offset -1h30m) # sum(comment_metric)\n + rate(y[${__range}])",
         {"x", "y"}),
    ]
    for expr, want in cases:
        got, unknown = metric_names(expr)
        if got != want or unknown:
            raise SystemExit(f"check_dashboard.py self-test: {expr!r}: got {sorted(got)} "
                             f"(unknown functions {sorted(unknown)}), want {sorted(want)}")
    _, unknown = metric_names("no_such_fn(x)")
    if unknown != {"no_such_fn"}:
        raise SystemExit("check_dashboard.py self-test: unknown functions not reported")


def collect_exprs(dashboard):
    """[(where, expr)] of every PromQL expression in the dashboard."""
    found = []

    def walk(panels, path):
        for p in panels or []:
            where = f"{path}panel {p.get('id')} '{p.get('title', '')}'"
            for t in p.get("targets", []) or []:
                if "expr" in t:
                    found.append((f"{where} target {t.get('refId', '?')}", t["expr"]))
            walk(p.get("panels"), where + " > ")  # a collapsed row holds its panels

    walk(dashboard.get("panels"), "")
    for row in dashboard.get("rows", []) or []:  # pre-5.0 layout
        walk(row.get("panels"), f"row '{row.get('title', '')}' > ")
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            expr = variable_query_exprs(var.get("query"))
            if expr:
                found.append((f"variable ${var.get('name')}", expr))
    return found


# ------------------------------------------------------------ what is exported

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def families_from_scrape(text):
    """{family: type} from the `# TYPE` lines of a Prometheus text scrape."""
    families = {}
    for line in text.splitlines():
        m = re.match(r"#\s*TYPE\s+([A-Za-z_:][A-Za-z0-9_:]*)\s+(\w+)", line)
        if m:
            families[m.group(1)] = m.group(2)
    return families


def families_from_source(metrics_cc):
    """{family: (type, labelled)} from the BuildX().Name("...") calls in
    server/metrics.cc. labelled: the statement does not add its one
    label-less child itself (no `.Add({}` after Register), so the family has
    no series, and no # TYPE line, until the server first adds a child."""
    strings = []

    def keep(m):  # string literals (Help texts may hold ';') become "N"
        strings.append(m.group(1))
        return f'"{len(strings) - 1}"'

    text = re.sub(r'"((?:[^"\\\n]|\\.)*)"', keep, open(metrics_cc).read())
    text = re.sub(r"//[^\n]*", "", text)
    families = {}
    for m in re.finditer(r"Build(Counter|Gauge|Histogram|Summary|Info)\(\)\s*"
                         r"\.Name\(\s*\"(\d+)\"([^;]*);", text):
        families[strings[int(m.group(2))]] = (
            m.group(1).lower(), not re.search(r"\.Add\(\s*\{\s*\}", m.group(3)))
    return families


def series_names(families):
    names = set()
    for family, kind in families.items():
        names.add(family)
        if kind == "histogram":
            names |= {family + "_bucket", family + "_sum", family + "_count"}
        elif kind == "summary":
            names |= {family + "_sum", family + "_count"}
        elif kind == "counter" and not family.endswith("_total"):
            names.add(family + "_total")  # OpenMetrics-style family names
    return names


def is_ready(port, log_path):
    """True once the server is ready; raises OSError while nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:
        if e.code != 404:
            return False  # 503: loading or warming up
    # No /readyz on this server: its start-up line says it is serving.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5):
        pass
    with open(log_path) as f:
        return "vdm-server: serving" in f.read()


def scrape_server(server, model, workdir):
    """Starts vdm-server, waits until it is ready, scrapes /metrics, stops it.

    Ready means /metrics answers and the server is ready (model loaded and
    warmed up): /metrics already answers during the warm-up, before the
    families the warm-up touches exist. Readiness is /readyz answering 200
    where the server has it (503: not yet); a server without it (404) is
    ready once it has printed its "vdm-server: serving" line.
    """
    for attempt in range(3):  # the free port may be taken before the server binds it
        port = free_port()
        log_path = os.path.join(workdir, f"server{attempt}.log")
        log = open(log_path, "w")
        proc = subprocess.Popen(
            [server, f"--model={model}", "--address=127.0.0.1:0",
             f"--metrics_address=127.0.0.1:{port}", "--devices=cpu", "--threads=1",
             "--drain_seconds=5"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/metrics"
        text, deadline = None, time.monotonic() + READY_TIMEOUT_S
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if is_ready(port, log_path):
                        with urllib.request.urlopen(url, timeout=5) as r:
                            text = r.read().decode()
                        break
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
                time.sleep(0.2)  # waiting for the process to start
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    rc = "killed after SIGTERM timed out"
                if rc != 0:
                    print(f"warning: vdm-server exited {rc} after SIGTERM")
            log.close()
        output = open(log_path).read()
        if text is not None:
            return text
        if "cannot serve metrics" in output and attempt < 2:
            continue
        sys.stdout.write(output)
        raise SystemExit(f"FAILED: vdm-server did not serve {url} and report ready "
                         f"within {READY_TIMEOUT_S} s (exit {proc.returncode})")
    raise AssertionError("unreachable")


def main(argv):
    if len(argv) not in (4, 5):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    server, model, repo = argv[1:4]
    dashboard_path = argv[4] if len(argv) == 5 else os.path.join(
        repo, "deploy", "grafana", "vdm-serve.json")
    metrics_cc = os.path.join(repo, "server", "metrics.cc")
    self_test()

    with open(dashboard_path) as f:
        dashboard = json.load(f)
    print(f"dashboard: {dashboard_path} ('{dashboard.get('title')}', "
          f"schemaVersion {dashboard.get('schemaVersion')})")
    check(isinstance(dashboard.get("schemaVersion"), int) and dashboard["schemaVersion"] >= 36,
          "schemaVersion is 36 or later")
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("datasource", {})
    check(ds.get("type") == "datasource" and ds.get("query") == "prometheus",
          "templating has a Prometheus datasource variable named 'datasource'")

    # Every panel and target that names a data source names ${datasource}.
    def datasources(panels, out):
        for p in panels or []:
            if p.get("type") != "row":
                out.append((p.get("id"), p.get("title"), p.get("datasource")))
                for t in p.get("targets", []) or []:
                    out.append((p.get("id"), p.get("title"), t.get("datasource", p.get("datasource"))))
            datasources(p.get("panels"), out)
        return out

    uses = datasources(dashboard.get("panels"), [])
    bad = [(i, t) for i, t, d in uses if not (isinstance(d, dict) and d.get("uid") == "${datasource}")]
    check(not bad, "every panel and target uses the ${datasource} variable"
          + (f" (not: {bad})" if bad else ""))
    ids = [p.get("id") for p in _all_panels(dashboard.get("panels"))]
    check(len(ids) == len(set(ids)), "panel ids are unique")

    exprs = collect_exprs(dashboard)
    check(len(exprs) >= 10, f"found {len(exprs)} PromQL expressions")

    with tempfile.TemporaryDirectory() as workdir:
        scrape = scrape_server(server, model, workdir)
    scraped = families_from_scrape(scrape)
    check(len(scraped) >= 5, f"the scrape has {len(scraped)} metric families (# TYPE lines)")
    source = families_from_source(metrics_cc)
    check(len(source) >= 5, f"server/metrics.cc registers {len(source)} metric families")
    # The fallback's parser must see what the server registers.
    missing_in_source = sorted(n for n in scraped if n.startswith("vdm_") and n not in source)
    check(not missing_in_source,
          "every vdm_ family in the scrape is found in server/metrics.cc"
          + (f" (not: {', '.join(missing_in_source)})" if missing_in_source else ""))
    # Only labelled families may be missing from a scrape; a label-less one
    # that is missing is not in this binary (a stale build), so it is not
    # taken from the source.
    fallback = {n: t for n, (t, labelled) in source.items() if n not in scraped and labelled}
    stale = sorted(n for n, (t, labelled) in source.items() if n not in scraped and not labelled)
    if fallback:
        print("note: not in the scrape until first used (labelled families), taken from "
              f"server/metrics.cc: {', '.join(sorted(fallback))}")
    if stale:
        print("note: in server/metrics.cc without labels but not exported by this "
              f"vdm-server (rebuild it?), so not counted: {', '.join(stale)}")
    exported = series_names({**fallback, **scraped})

    used = set()
    for where, expr in exprs:
        names, unknown = metric_names(expr)
        used |= names
        not_exported = sorted(names - exported)
        check(not not_exported and not unknown and names,
              f"{where}: {', '.join(sorted(names)) or 'NO METRIC'}"
              + (f" -- NOT EXPORTED by vdm-server: {', '.join(not_exported)}" if not_exported else "")
              + (f" -- unknown PromQL function(s): {', '.join(sorted(unknown))}" if unknown else ""))
    unused = sorted(f for f in {**fallback, **scraped}
                    if not series_names({f: ({**fallback, **scraped})[f]}) & used)
    if unused:
        print(f"note: exported families the dashboard does not chart: {', '.join(unused)}")

    if FAILURES:
        print(f"\ncheck_dashboard: {len(FAILURES)} check(s) FAILED:")
        for f in FAILURES:
            print("  " + f)
        return 1
    print(f"check_dashboard: all passed ({len(exprs)} expressions, {len(used)} metric names)")
    return 0


def _all_panels(panels):
    for p in panels or []:
        yield p
        yield from _all_panels(p.get("panels"))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
