"""Generate Python gRPC stubs from the .proto files TorchServe ships inside its frontend jar.

Writes ``scripts/serve/ts_grpc/{inference,management}_pb2{,_grpc}.py`` (``make grpc-stubs``), so the stubs
always match the installed TorchServe. ``google/rpc/status.proto`` comes from googleapis-common-protos.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

PROTOS = ("inference.proto", "management.proto")


def frontend_jar() -> Path:
    """Path of the installed TorchServe frontend jar."""
    import ts

    return Path(ts.__file__).parent / "frontend" / "model-server.jar"


def generate(out_dir: Path, work_dir: Path) -> None:
    """Extract the protos into ``work_dir/ts_grpc`` and compile them into ``out_dir/ts_grpc``."""
    from grpc_tools import protoc

    package = work_dir / "ts_grpc"
    package.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(frontend_jar()) as jar:
        for name in PROTOS:
            (package / name).write_bytes(jar.read(name))
        status = work_dir / "google" / "rpc" / "status.proto"  # for protoc only; not compiled here
        status.parent.mkdir(parents=True, exist_ok=True)
        status.write_bytes(jar.read("google/rpc/status.proto"))
    (out_dir / "ts_grpc").mkdir(parents=True, exist_ok=True)
    (out_dir / "ts_grpc" / "__init__.py").write_text('"""Generated TorchServe gRPC stubs."""\n')
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    for name in PROTOS:
        code = protoc.main(
            [
                "protoc",
                f"-I{work_dir}",
                f"-I{well_known}",
                f"--python_out={out_dir}",
                f"--grpc_python_out={out_dir}",
                f"ts_grpc/{name}",
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {name} with exit code {code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("scripts/serve"))
    parser.add_argument("--work", type=Path, default=Path("build/proto"))
    args = parser.parse_args(argv)
    generate(args.out, args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
