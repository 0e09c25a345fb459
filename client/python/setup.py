"""The build hook of the vdm-client package (the metadata is pyproject.toml).

build_py copies vdm_client as usual, then generates into the build tree, with
protoc and grpc_python_plugin from PATH (Debian: protobuf-compiler,
protobuf-compiler-grpc), what CMake generates into <build>/python
(client/python/CMakeLists.txt):

  vdm/v1/vdm_pb2.py, vdm_pb2_grpc.py     from proto/vdm/v1/vdm.proto
  vdm_client/_health/health_pb2*.py      from grpc/health/v1/health.proto,
                                         the import of health_pb2 pointed at
                                         vdm_client._health (a top-level
                                         `grpc` package would shadow grpcio)

Where the protos are: $VDM_PROTO_DIR, else ../../proto beside this file (a
checkout); $VDM_GRPC_PROTO_DIR, else /usr/share/grpc-proto (grpc-proto).
setuptools' own build/ and egg-info go to a temporary directory, so that
`pip install ./client/python` leaves the checkout as it was.
"""

import atexit
import os
import shutil
import subprocess
import tempfile

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
HEALTH_IMPORT = "from grpc.health.v1 import health_pb2 "
HEALTH_IMPORT_NEW = "from vdm_client._health import health_pb2 "


def _tool(env: str, name: str) -> str:
    path = os.environ.get(env) or shutil.which(name)
    if not path:
        raise SystemExit(
            f"vdm-client build: {name} not found on PATH (set ${env}); on "
            "Debian install protobuf-compiler and protobuf-compiler-grpc")
    return path


def _proto_root(env: str, default: str, rel: str) -> str:
    root = os.environ.get(env) or default
    if not os.path.isfile(os.path.join(root, rel)):
        raise SystemExit(
            f"vdm-client build: {rel} not found under {root} (set ${env} to "
            "the directory that holds it)")
    return root


def _protoc(root: str, rel: str, out: str) -> None:
    protoc = _tool("PROTOC", "protoc")
    plugin = _tool("GRPC_PYTHON_PLUGIN", "grpc_python_plugin")
    os.makedirs(out, exist_ok=True)
    command = [protoc, f"--proto_path={root}", f"--python_out={out}",
               f"--grpc_python_out={out}",
               f"--plugin=protoc-gen-grpc_python={plugin}", rel]
    print("vdm-client build:", " ".join(command))
    subprocess.run(command, check=True)


class BuildWithStubs(build_py):
    """build_py, then the generated stubs into the same build tree."""

    def run(self):
        super().run()
        lib = self.build_lib
        api_root = _proto_root("VDM_PROTO_DIR",
                               os.path.join(HERE, os.pardir, os.pardir, "proto"),
                               "vdm/v1/vdm.proto")
        _protoc(api_root, "vdm/v1/vdm.proto", lib)
        for package in ("vdm", os.path.join("vdm", "v1")):
            open(os.path.join(lib, package, "__init__.py"), "a").close()

        health_root = _proto_root("VDM_GRPC_PROTO_DIR", "/usr/share/grpc-proto",
                                  "grpc/health/v1/health.proto")
        stage = tempfile.mkdtemp(prefix="vdm-health-")
        try:
            _protoc(health_root, "grpc/health/v1/health.proto", stage)
            generated = os.path.join(stage, "grpc", "health", "v1")
            out = os.path.join(lib, "vdm_client", "_health")
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(generated, "health_pb2_grpc.py")) as f:
                stub = f.read()
            if HEALTH_IMPORT not in stub:
                raise SystemExit(
                    f"vdm-client build: no {HEALTH_IMPORT!r} in the generated "
                    "health_pb2_grpc.py (has grpc_python_plugin changed?)")
            with open(os.path.join(out, "health_pb2_grpc.py"), "w") as f:
                f.write(stub.replace(HEALTH_IMPORT, HEALTH_IMPORT_NEW))
            shutil.copyfile(os.path.join(generated, "health_pb2.py"),
                            os.path.join(out, "health_pb2.py"))
            with open(os.path.join(out, "__init__.py"), "w") as f:
                f.write("# grpc.health.v1 stubs generated from "
                        "grpc/health/v1/health.proto, kept\n# inside "
                        "vdm_client so that they do not shadow the `grpc` "
                        "module.\n")
        finally:
            shutil.rmtree(stage, ignore_errors=True)


# setuptools' scratch space outside the source tree (and per build, so that
# two builds of one checkout do not share it).
_scratch = tempfile.mkdtemp(prefix="vdm-client-build-")
atexit.register(shutil.rmtree, _scratch, True)

setup(
    cmdclass={"build_py": BuildWithStubs},
    options={"build": {"build_base": os.path.join(_scratch, "build")},
             "egg_info": {"egg_base": _scratch}},
)
