#!/usr/bin/env python3
"""The build holds the layers (docs/design.md, "Layers"): configures the
project into a temporary folder with `cmake --graphviz`, reads the link
graph, and fails if a transport-free target reaches a transport library:

- vdm_engine (the engine and its tasks) and vdm_validation and
  vdm_proto_messages (request validation, the proto messages and their
  conversions) must not link gRPC, prometheus-cpp, cpp-httplib or OpenSSL,
  directly or through any target they link.

  python3 tests/build/link_graph_test.py SOURCE_DIR
"""

import collections
import re
import subprocess
import sys
import tempfile

CHECKED = ("vdm_engine", "vdm_validation", "vdm_proto_messages")
FORBIDDEN = re.compile(r"grpc|prometheus|httplib|ssl|crypto", re.IGNORECASE)


def link_graph(source):
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            ["cmake", "-S", source, "-B", tmp, "-DVDM_BUILD_TESTS=OFF",
             f"--graphviz={tmp}/links.dot"],
            capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            sys.exit(f"link_graph_test: cmake failed:\n{done.stdout}{done.stderr}")
        with open(f"{tmp}/links.dot") as f:
            dot = f.read()
    labels = dict(re.findall(r'"(node\d+)" \[ label = "([^"]*)"', dot))
    edges = collections.defaultdict(set)
    for a, b in re.findall(r'"(node\d+)" -> "(node\d+)"', dot):
        edges[labels[a]].add(labels[b])
    return set(labels.values()), edges


def reached(start, edges):
    """Every target and library `start` links, with the path to each."""
    paths = {start: [start]}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(edges[node]):
            if nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    return paths


def main():
    nodes, edges = link_graph(sys.argv[1])
    failed = 0
    for target in CHECKED:
        if target not in nodes:
            print(f"link_graph_test: FAIL no target {target} in the graph")
            failed += 1
            continue
        paths = reached(target, edges)
        bad = sorted(n for n in paths if FORBIDDEN.search(n))
        for n in bad:
            print(f"link_graph_test: FAIL {' -> '.join(paths[n])}")
        failed += bool(bad)
        print(f"link_graph_test: {target}: {len(paths) - 1} dependencies, "
              f"{'none' if not bad else len(bad)} forbidden")
    # The check must be able to fail: the server does reach them.
    server = reached("vdm_server", edges)
    if not any(FORBIDDEN.search(n) for n in server):
        print("link_graph_test: FAIL vdm_server reaches no transport library: "
              "the pattern matches nothing")
        failed += 1
    print(f"{len(CHECKED) + 1 - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
