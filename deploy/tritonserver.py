"""Entrypoint of the kit's Triton image: ``tritonserver`` with the repository's python steps able to run.

On the image built here (``make image``, Debian base) the server is the one ``nvidia-pytriton`` bundles:
it is copied once (``--prepare``, at build time) with the python backend stub for this interpreter, and
started with the environment its stubs need (``scripts/deploy/tritonctl.py``, shared with ``make triton-serve``).
On NVIDIA's image (``BASE_IMAGE=nvcr.io/nvidia/tritonserver:<version>-py3``) its own
``/opt/tritonserver/bin/tritonserver`` is used as it is. A leading ``tritonserver`` argument (as KServe's
ServingRuntime passes) is dropped. Triton stops gracefully on SIGTERM by itself (``--exit-timeout-secs``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

NVIDIA = Path("/opt/tritonserver/bin/tritonserver")
BUNDLED = Path("/opt/servekit-triton")


def health(cmdline: Path = Path("/proc/1/cmdline")) -> int:
    """The HEALTHCHECK: 0 when the running server's HTTP endpoint says ready (its address and port read from
    its own command line, so moved ports are followed)."""
    import urllib.request

    host, port = "127.0.0.1", "8000"
    for arg in cmdline.read_bytes().decode("utf-8", "replace").split("\0"):
        if arg.startswith("--http-port="):
            port = arg.split("=", 1)[1]
        elif arg.startswith("--http-address=") and arg.split("=", 1)[1] not in ("", "0.0.0.0"):
            host = arg.split("=", 1)[1]
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v2/health/ready", timeout=4) as reply:
            return 0 if reply.status == 200 else 1
    except OSError:
        return 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["--health"]:
        return health()
    if argv[:1] == ["tritonserver"]:
        argv = argv[1:]
    if NVIDIA.is_file():
        os.execv(NVIDIA, [str(NVIDIA), *argv])
    from tritonctl import prepare_server, server_environment

    binary = prepare_server(BUNDLED)
    if argv[:1] == ["--prepare"]:
        return 0
    defaults = [
        f"--backend-directory={BUNDLED / 'backends'}",
        f"--cache-directory={BUNDLED / 'caches'}",
        # each python step's stub imports torch: on a busy 2-core node that takes longer than the 30 s default
        "--backend-config=python,stub-timeout-seconds=180",
    ]
    os.execve(binary, [str(binary), *defaults, *argv], server_environment(dict(os.environ)))
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
