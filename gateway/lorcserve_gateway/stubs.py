"""The Python gRPC stubs of the public API (proto/lorcserve/v1/lorcserve.proto).

Generated code is never committed: `load(stubs_dir, proto_dir)` runs protoc (Debian's
protobuf-compiler with protobuf-compiler-grpc's grpc_python_plugin, which scripts/install-deps.sh
installs) into `stubs_dir` when the stubs are missing or older than the .proto, then imports them.
The container image generates them at build time (Dockerfile).
"""

import importlib
import os
import shutil
import subprocess
import sys

PROTO = "lorcserve/v1/lorcserve.proto"


class StubError(RuntimeError):
    """The stubs could not be generated or imported; the message says why."""


def _generate(stubs_dir, proto_dir):
    protoc = shutil.which("protoc")
    plugin = shutil.which("grpc_python_plugin")
    if protoc is None or plugin is None:
        raise StubError(
            f"--stubs-dir {stubs_dir}: no generated stubs and no protoc / grpc_python_plugin on "
            "PATH to make them (Debian: protobuf-compiler, protobuf-compiler-grpc)")
    os.makedirs(stubs_dir, exist_ok=True)
    out = subprocess.run(
        [protoc, f"--proto_path={proto_dir}", f"--python_out={stubs_dir}",
         f"--grpc_out={stubs_dir}", f"--plugin=protoc-gen-grpc={plugin}",
         os.path.join(proto_dir, PROTO)],
        capture_output=True, text=True)
    if out.returncode != 0:
        raise StubError(f"protoc {PROTO} failed: {out.stderr.strip()}")


def load(stubs_dir, proto_dir=None):
    """Returns (lorcserve_pb2, lorcserve_pb2_grpc), generating them into `stubs_dir` first when
    `proto_dir` is given and they are missing or older than the .proto. Raises StubError."""
    stubs_dir = os.path.abspath(stubs_dir)
    gen = os.path.join(stubs_dir, "lorcserve", "v1", "lorcserve_pb2.py")
    if proto_dir is not None:
        src = os.path.join(proto_dir, PROTO)
        if not os.path.exists(src):
            raise StubError(f"--proto-dir {proto_dir}: no {PROTO}")
        if not os.path.exists(gen) or os.path.getmtime(gen) < os.path.getmtime(src):
            _generate(stubs_dir, proto_dir)
    if not os.path.exists(gen):
        raise StubError(f"--stubs-dir {stubs_dir}: no {gen} (give --proto-dir to generate it)")
    if stubs_dir not in sys.path:
        sys.path.insert(0, stubs_dir)
    try:
        pb2 = importlib.import_module("lorcserve.v1.lorcserve_pb2")
        pb2_grpc = importlib.import_module("lorcserve.v1.lorcserve_pb2_grpc")
    except ImportError as e:
        raise StubError(f"--stubs-dir {stubs_dir}: cannot import the stubs: {e}") from e
    return pb2, pb2_grpc
