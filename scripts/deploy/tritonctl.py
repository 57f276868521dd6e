"""Start and stop the ``tritonserver`` that ``nvidia-pytriton`` bundles, on loopback (``make triton-serve``).

The bundled server (Triton 2.51, python backend only) needs: a copy of its distribution with the python
backend stub for this interpreter's version (as pytriton itself prepares it), ``LD_LIBRARY_PATH`` with the
interpreter's ``LIBDIR`` and ``nvidia_pytriton.libs``, and the venv's ``bin/`` first on ``PATH`` (the stub
then imports the venv's packages). Every listener binds to 127.0.0.1; models load explicitly; the
model-repository and shared-memory APIs need the ``servekit-admin`` header whose key is written to
``<workdir>/triton_admin_key``.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from tsctl import free_ports

logger = logging.getLogger("tritonctl")
ADMIN_HEADER = "servekit-admin"


@dataclass(frozen=True)
class TritonEndpoints:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def random(cls) -> TritonEndpoints:
        return cls(*free_ports(3))

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"


def distribution() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def prepare_server(dest: Path) -> Path:
    """Copy the bundled Triton with the python stub for this interpreter; return the ``tritonserver`` path."""
    binary = dest / "bin" / "tritonserver"
    stub = dest / "backends" / "python" / "triton_python_backend_stub"
    if binary.is_file() and stub.is_file():
        return binary
    shutil.rmtree(dest, ignore_errors=True)
    source = distribution()
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    shutil.copy(source / "python_backend_stubs" / version / "triton_python_backend_stub", stub)
    return binary


def server_environment(base: dict[str, str]) -> dict[str, str]:
    """The environment the bundled server and its python stubs need."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    libs = str(distribution().parent.parent / "nvidia_pytriton.libs")
    env = dict(base)
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, libs, base.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{base.get('PATH', '/usr/bin:/bin')}"
    site = sysconfig.get_paths()["purelib"]
    env["PYTHONPATH"] = site
    env["PYTHONNOUSERSITE"] = "1"
    return env


class Triton:
    """One ``tritonserver`` process in its own session and work directory."""

    def __init__(self, workdir: Path, repository: Path, models: Sequence[str], endpoints: TritonEndpoints) -> None:
        self.workdir = workdir.resolve()
        self.repository = repository.resolve()
        self.models = list(models)
        self.endpoints = endpoints
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.workdir / "tritonserver.log"

    def command(self, binary: Path, admin_key: str) -> list[str]:
        ep = self.endpoints
        args = [
            str(binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={binary.parent.parent / 'backends'}",
            f"--cache-directory={binary.parent.parent / 'caches'}",
            "--http-address=127.0.0.1",
            f"--http-port={ep.http}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={ep.grpc}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={ep.metrics}",
            "--allow-gpu-metrics=false",
            "--model-control-mode=explicit",
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--http-restricted-api=model-repository,shared-memory:{ADMIN_HEADER}={admin_key}",
            f"--grpc-restricted-protocol=model-repository,shared-memory:{ADMIN_HEADER}={admin_key}",
        ]
        return args + [f"--load-model={m}" for m in self.models]

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = prepare_server(self.workdir.parent / "tritonserver-dist")
        admin_key = secrets.token_hex(16)
        key_file = self.workdir / "triton_admin_key"
        key_file.write_text(admin_key + "\n", encoding="utf-8")
        key_file.chmod(0o600)
        log = self.log_file.open("wb")
        self.process = subprocess.Popen(
            self.command(binary, admin_key),
            cwd=self.workdir,
            env=server_environment(dict(os.environ)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        (self.workdir / "tritonserver.pid").write_text(str(self.process.pid), encoding="utf-8")
        logger.info("tritonserver started (pid %d), log %s", self.process.pid, self.log_file)

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Wait until the server and every model it loads are ready."""
        deadline = time.monotonic() + timeout
        url = f"http://{self.endpoints.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}; see {self.log_file}")
            try:
                if requests.get(url, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s; see {self.log_file}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server and its python stubs (the whole process group)."""
        pid_file = self.workdir / "tritonserver.pid"
        pid = self.process.pid if self.process is not None else None
        if pid is None and pid_file.is_file():
            pid = int(pid_file.read_text())
        if pid is None:
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pid_file.unlink(missing_ok=True)
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_alive(pid):
            if self.process is not None:
                self.process.poll()  # reap the exited server: a zombie leader keeps its group "alive"
            time.sleep(0.2)
        if _group_alive(pid):
            os.killpg(pid, signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=10)
        pid_file.unlink(missing_ok=True)
        logger.info("tritonserver stopped (process group %d)", pid)


def ensembles(repository: Path) -> list[str]:
    """The ensembles of a generated repository (the models clients call)."""
    return sorted(p.parent.name for p in repository.glob("*/config.pbtxt") if 'platform: "ensemble"' in p.read_text())


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--workdir", type=Path, default=Path("build/triton"))
    parser.add_argument("--repository", type=Path, default=Path("model_repository/cpu"))
    parser.add_argument("--models", nargs="*", default=None, help="ensembles to load (default: every one)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    names = args.models or ensembles(args.repository)
    server = Triton(
        args.workdir, args.repository, names, TritonEndpoints(args.http_port, args.grpc_port, args.metrics_port)
    )
    if args.action == "stop":
        server.stop()
        return 0
    server.start()
    try:
        server.wait_ready()
    except (TimeoutError, RuntimeError):
        server.stop()
        raise
    ep = server.endpoints
    logger.info("Triton is ready with ensembles: %s", ", ".join(names))
    logger.info("  HTTP %s   gRPC %s   metrics 127.0.0.1:%d", ep.http_url, ep.grpc_url, ep.metrics)
    logger.info("  log  %s", server.log_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
