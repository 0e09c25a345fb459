#!/usr/bin/python3
"""Checks Dockerfile and Dockerfile.cuda without a container engine.

  /usr/bin/python3 check_dockerfile.py REPO_ROOT VDM_SERVER VDM_CLIENT

What can be checked on the host: the stages and base image, that the build
stage installs the packages of scripts/install-deps.sh, that each runtime
package exists (apt-cache) and that together they provide every shared library
the built binaries link directly (readelf NEEDED -> ldd path -> dpkg -S), the
non-root user, the exposed ports and the HEALTHCHECK against the binaries'
flags, the checkpoint's place against --model, and that .dockerignore lets in
everything the Dockerfiles COPY. Run by check_dockerfile.sh.
"""

import json
import os
import re
import shlex
import subprocess
import sys

from check_manifests import parse_helpfull

FAILURES = []
# In every debian:bookworm-slim image (Priority: required, or apt needs them).
BASE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}
# What Dockerfile.cuda takes from LibTorch rather than from Debian.
LIBTORCH_LIBS = re.compile(r"^(libtorch|libc10|libtorch_cpu|libtorch_cuda|libgomp)")


def check(ok, what):
    print(("ok      " if ok else "FAILED  ") + what)
    if not ok:
        FAILURES.append(what)
    return ok


def run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def instructions(path):
    """[(stage index, INSTRUCTION, arguments)] with continuation lines joined."""
    with open(path) as f:
        text = re.sub(r"\\\n", " ", f.read())
    result, stage = [], -1
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stage += 1
        result.append((stage, word, rest.strip()))
    return result


def helpfull_flags(binary):
    r = run(binary, "--helpfull")  # absl exits 1 after the text
    return parse_helpfull(r.stdout + r.stderr)


def needed_packages(binary):
    """{library soname: Debian package owning it} for the binary's NEEDED."""
    elf = run("readelf", "-d", binary).stdout
    needed = re.findall(r"\(NEEDED\).*\[(.+?)\]", elf)
    paths = dict(re.findall(r"^\s*(\S+) => (\S+)", run("ldd", binary).stdout, re.M))
    # dpkg knows a file by the path its package installed, which may be the
    # /usr-merged or the resolved one: ask for all of them in one call.
    candidates = {}
    for lib in needed:
        path = paths.get(lib)
        if path:
            for c in (path, os.path.realpath(path), "/usr" + path):
                candidates.setdefault(c, lib)
    owners = {lib: None for lib in needed}
    out = run("dpkg", "-S", *candidates).stdout if candidates else ""
    for line in out.splitlines():
        package, _, path = line.partition(": ")
        lib = candidates.get(path.strip())
        if lib and owners[lib] is None:
            owners[lib] = package.split(":")[0].strip()
    return owners


def known_packages(names):
    """The subset of `names` that apt-cache knows."""
    out = run("apt-cache", "show", "--no-all-versions", *names).stdout
    return set(re.findall(r"^Package: (\S+)", out, re.M))


def check_dockerfile(repo, name, server_flags, client_flags, needed, cuda):
    print(f"--- {name}")
    path = os.path.join(repo, name)
    ins = instructions(path)
    args = {}
    for stage, word, rest in ins:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key, value.strip('"'))
    froms = [rest for _, word, rest in ins if word == "FROM"]
    check(len(froms) == 2 and froms[0].endswith("AS build") and froms[1].endswith("AS runtime"),
          f"{name}: two stages, build and runtime ({froms})")
    check(all(f.split()[0] == "${DEBIAN_IMAGE}" for f in froms) and
          args.get("DEBIAN_IMAGE") == "debian:bookworm-slim",
          f"{name}: both stages FROM debian:bookworm-slim")
    build = [(w, r) for s, w, r in ins if s == 0]
    runtime = [(w, r) for s, w, r in ins if s == 1]
    check(any(w == "RUN" and "scripts/install-deps.sh" in r for w, r in build),
          f"{name}: the build stage installs the packages of scripts/install-deps.sh")
    check(any(w == "RUN" and "cmake --build" in r and "vdm-server" in r and "vdm-client" in r
              for w, r in build), f"{name}: the build stage builds vdm-server and vdm-client")

    # Runtime packages: they exist, and cover the binaries' libraries.
    packages = set(args.get("RUNTIME_PACKAGES", "").split())
    for w, r in runtime:
        if w == "RUN":
            for m in re.finditer(r"apt-get install ([^&]*)", r):
                packages |= {p for p in m.group(1).split() if not p.startswith(("-", "$"))}
    check(len(packages) >= 5, f"{name}: runtime packages {' '.join(sorted(packages))}")
    known = known_packages(sorted(packages))
    for p in sorted(packages):
        check(p in known, f"{name}: runtime package {p} exists in the apt sources")
    for lib, owner in sorted(needed.items()):
        if cuda and LIBTORCH_LIBS.match(lib):
            continue
        check(owner is not None and (owner in packages or owner in BASE_PACKAGES),
              f"{name}: {lib} (package {owner}) is installed in the runtime stage")

    users = [r for w, r in runtime if w == "USER"]
    check(bool(users) and users[-1].split(":")[0] not in ("0", "root"),
          f"{name}: runs as a non-root user ({users[-1] if users else 'none'})")
    exposed = {int(p.split("/")[0]) for w, r in runtime if w == "EXPOSE" for p in r.split()}
    grpc_port = int(server_flags["address"].strip('"').rsplit(":", 1)[1])
    metrics_port = int(server_flags["metrics_address"].strip('"').rsplit(":", 1)[1])
    check({grpc_port, metrics_port} <= exposed,
          f"{name}: EXPOSE {sorted(exposed)} has the gRPC ({grpc_port}) and metrics "
          f"({metrics_port}) ports of vdm-server's defaults")

    health = [r for w, r in runtime if w == "HEALTHCHECK"]
    if check(len(health) == 1, f"{name}: one HEALTHCHECK"):
        cmd = health[0].split("CMD", 1)[1].strip()
        argv = json.loads(cmd) if cmd.startswith("[") else shlex.split(cmd)
        check(argv[0] == "vdm-client" and argv[-1] == "health",
              f"{name}: HEALTHCHECK runs vdm-client ... health ({' '.join(argv)})")
        for a in argv[1:-1]:
            flag = re.match(r"--(\w+)", a)
            check(flag is not None and flag.group(1) in client_flags,
                  f"{name}: HEALTHCHECK flag {a} is one vdm-client accepts")
        targets = [a.split("=", 1)[1] for a in argv if a.startswith("--target=")]
        check(len(targets) == 1 and targets[0].endswith(f":{grpc_port}"),
              f"{name}: HEALTHCHECK targets the gRPC port {grpc_port}")

    # The checkpoint lands where vdm-server's default --model finds it.
    workdir = [r for w, r in runtime if w == "WORKDIR"]
    default_model = server_flags["model"].strip('"')
    copies = [r.split() for w, r in runtime if w == "COPY"]
    model_copy = [c for c in copies
                  if c[-1].endswith(".pt") and not c[-1].endswith(".features.pt")]
    check(len(model_copy) == 1 and bool(workdir) and
          os.path.normpath(os.path.join(workdir[-1], model_copy[0][-1])) ==
          os.path.normpath(os.path.join(workdir[-1], default_model)),
          f"{name}: the checkpoint is copied to WORKDIR/{default_model}, vdm-server's default --model")
    # Its calibration and feature network beside it, where the server
    # looks for them (<model>.calibration.json, <model>.features.pt).
    for suffix in (".calibration.json", ".features.pt"):
        check(any(bool(workdir) and
                  os.path.normpath(os.path.join(workdir[-1], c[-1])) ==
                  os.path.normpath(os.path.join(workdir[-1], default_model + suffix))
                  for c in copies),
              f"{name}: {default_model}{suffix} is copied beside the checkpoint")
    sources = [c[0] for _, w, r in ins if w == "COPY"
               for c in [r.split()] if not c[0].startswith("--")]
    return sources, (os.path.join(workdir[-1], default_model) if workdir else "")


def check_dockerignore(repo, sources):
    print("--- .dockerignore")
    with open(os.path.join(repo, ".dockerignore")) as f:
        lines = [l.strip() for l in f if l.strip() and not l.startswith("#")]
    check(lines and lines[0] == "**", ".dockerignore starts by excluding everything (allow-list)")
    allowed = [l[1:].rstrip("/") for l in lines if l.startswith("!")]
    for src in sorted(set(sources)):
        ok = any(src == a or src.startswith(a + "/") for a in allowed)
        check(ok, f".dockerignore lets in {src}")
        if not src.endswith(".pt"):  # the checkpoint: a warning in main()
            check(os.path.exists(os.path.join(repo, src)), f"COPY source {src} exists")


def check_build_inputs(repo, sources):
    """Every source folder the top-level CMakeLists.txt builds from (outside
    the tests) is copied into the build stage: a static check that would have
    caught the missing tools/ folder."""
    print("--- build inputs")
    with open(os.path.join(repo, "CMakeLists.txt")) as f:
        text = f.read()
    # Drop the blocks that only the tests or the fuzzers configure.
    text = re.sub(r"if\((VDM_BUILD_TESTS|VDM_FUZZ)\).*?endif\(\)", "", text, flags=re.S)
    folders = set(re.findall(r"(?<![\w/$}])([a-z][a-z_]*)/[\w/.-]+\.cc\b", text))
    copied = {src.rstrip("/").split("/")[0] for src in sources}
    check(len(folders) >= 4, f"CMakeLists.txt builds from {sorted(folders)}")
    for folder in sorted(folders):
        check(folder in copied, f"the build stage copies {folder}/ (CMakeLists.txt compiles files in it)")


def main():
    repo, server, client = sys.argv[1:4]
    server_flags = helpfull_flags(server)
    client_flags = helpfull_flags(client)
    check({"model", "address", "metrics_address"} <= set(server_flags),
          f"vdm-server --helpfull parsed ({len(server_flags)} flags)")
    check({"target", "max_attempts", "timeout_s"} <= set(client_flags),
          f"vdm-client --helpfull parsed ({len(client_flags)} flags)")
    needed = {}
    for binary in (server, client):
        needed.update(needed_packages(binary))
    check(len(needed) >= 5 and any(l.startswith("libtorch") for l in needed),
          f"{len(needed)} NEEDED libraries of vdm-server and vdm-client resolved")
    sources = []
    model_paths = set()
    for name, cuda in (("Dockerfile", False), ("Dockerfile.cuda", True)):
        s, model = check_dockerfile(repo, name, server_flags, client_flags, needed, cuda)
        sources += s
        model_paths.add(model)
    check_dockerignore(repo, sources)
    check_build_inputs(repo, sources)

    with open(os.path.join(repo, "deploy", "base", "server.flags")) as f:
        flag_model = re.search(r"^--model=(\S+)", f.read(), re.M)
    check(flag_model is not None and {flag_model.group(1)} == model_paths,
          f"deploy/base/server.flags --model is the image's checkpoint {sorted(model_paths)}")
    shipped = os.path.join(repo, "model", "checkpoints", "fmnist.pt")
    if not os.path.exists(shipped):
        print("WARNING model/checkpoints/fmnist.pt is not in the tree yet: "
              "`docker build` fails at COPY until it is")

    print(f"{len(FAILURES)} check(s) failed" if FAILURES else "all Dockerfile checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
