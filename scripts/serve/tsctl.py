"""Start, wait for, and stop a TorchServe instance; used by ``make serve/stop``, the demo and the tests.

Each instance gets its own work directory: ``key_file.json`` is written there (TorchServe writes it
to its working directory), ``tmp/`` holds its pid file (TorchServe keeps one in ``$TMPDIR``, so two
instances with separate ``TMPDIR`` never collide), and ``logs/`` its logs. The process runs in its own
session, and :meth:`TorchServe.stop` ends the whole process group, workers included.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

logger = logging.getLogger("tsctl")

PORT_KEYS = (
    "inference_address",
    "management_address",
    "metrics_address",
    "grpc_inference_port",
    "grpc_management_port",
)
PGID_FILE = "torchserve.pgid"


@dataclass(frozen=True)
class Endpoints:
    """The five loopback ports of one TorchServe instance."""

    inference: int
    management: int
    metrics: int
    grpc_inference: int
    grpc_management: int
    host: str = "127.0.0.1"

    def url(self, which: str) -> str:
        """``http://host:port`` of ``inference``, ``management`` or ``metrics``."""
        return f"http://{self.host}:{getattr(self, which)}"

    def grpc(self, which: str) -> str:
        """``host:port`` of ``inference`` or ``management`` gRPC."""
        return f"{self.host}:{getattr(self, 'grpc_' + which)}"

    def properties(self) -> dict[str, str]:
        """These ports as config.properties entries."""
        return {
            "inference_address": self.url("inference"),
            "management_address": self.url("management"),
            "metrics_address": self.url("metrics"),
            "grpc_inference_port": str(self.grpc_inference),
            "grpc_management_port": str(self.grpc_management),
        }


@dataclass(frozen=True)
class Keys:
    """The three keys TorchServe's token authorization writes to ``key_file.json``."""

    inference: str
    management: str
    api: str

    @classmethod
    def read(cls, path: Path) -> Keys:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(data["inference"]["key"], data["management"]["key"], data["API"]["key"])


def worker_pids(endpoints: Endpoints, keys: Keys, model: str) -> list[int]:
    """The PIDs of a model's READY workers, from the management API."""
    import requests

    headers = {"Authorization": f"Bearer {keys.management}"}
    reply = requests.get(f"{endpoints.url('management')}/models/{model}", headers=headers, timeout=10)
    reply.raise_for_status()
    return sorted(int(w["pid"]) for w in reply.json()[0]["workers"] if w["status"] == "READY")


def read_properties(path: Path) -> dict[str, str]:
    """Parse a config.properties file (``key=value`` lines; ``#`` comments)."""
    result: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "!")) and "=" in stripped:
            key, _, value = stripped.partition("=")
            result[key.strip()] = value.strip()
    return result


def endpoints_of(path: Path) -> Endpoints:
    """The ports a config.properties file sets."""
    props = read_properties(path)

    def port(key: str) -> int:
        return int(props[key].rsplit(":", 1)[-1])

    return Endpoints(
        inference=port("inference_address"),
        management=port("management_address"),
        metrics=port("metrics_address"),
        grpc_inference=int(props["grpc_inference_port"]),
        grpc_management=int(props["grpc_management_port"]),
    )


def derive_config(base: Path, dest: Path, overrides: Mapping[str, str]) -> Path:
    """Copy ``base`` to ``dest`` with some keys replaced (or added); every other key is kept as shipped."""
    left = dict(overrides)
    lines = []
    for line in base.read_text(encoding="utf-8").splitlines():
        key = line.partition("=")[0].strip()
        replace = "=" in line and not line.lstrip().startswith("#") and key in left
        lines.append(f"{key}={left.pop(key)}" if replace else line)
    lines.extend(f"{k}={v}" for k, v in left.items())
    dest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on loopback."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def random_endpoints() -> Endpoints:
    """Five free loopback ports."""
    return Endpoints(*free_ports(5))


UNIX_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path, less its terminating NUL)
SOCKET_NAME_ROOM = 16  # "/.ts.sock.65535"


def server_tmp(workdir: Path) -> Path:
    """The server's ``TMPDIR``, where its workers' Unix sockets live: ``<workdir>/tmp``, or, when that path is too
    long for a socket (a deep working folder), a private ``/tmp/servekit-<hash of workdir>`` (mode 0700)."""
    tmp = workdir / "tmp"
    if len(str(tmp).encode()) + SOCKET_NAME_ROOM <= UNIX_PATH_MAX:
        return tmp
    short = Path("/tmp") / f"servekit-{hashlib.sha256(str(workdir).encode()).hexdigest()[:12]}"
    short.mkdir(mode=0o700, exist_ok=True)
    info = short.lstat()
    if short.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:  # not ours alone: a fresh one
        return Path(tempfile.mkdtemp(prefix="servekit-", dir="/tmp"))
    return short


class TorchServe:
    """One TorchServe process tree in its own work directory."""

    def __init__(
        self,
        workdir: Path,
        config: Path,
        model_store: Path,
        models: Iterable[str] = ("all",),
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = workdir.resolve()
        self.config = config.resolve()
        self.model_store = model_store.resolve()
        self.models = list(models)
        self.extra_args = list(extra_args)  # e.g. --disable-token-auth, as a KServe runtime starts it
        self.env = dict(env or {})  # e.g. TS_* overrides where the config enables them
        self.token_auth = "--disable-token-auth" not in self.extra_args
        self.endpoints = endpoints_of(self.config)
        self.pgid_file = self.workdir / "tmp" / PGID_FILE

    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    def start(self) -> None:
        """Launch ``torchserve --foreground`` detached in its own session; returns at once."""
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "key_file.json").unlink(missing_ok=True)  # a killed server leaves its old keys
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # archives must be self-contained
        tmp = str(server_tmp(self.workdir))
        env.update(TMPDIR=tmp, TEMP=tmp, LOG_LOCATION=str(self.log_dir), METRICS_LOCATION=str(self.log_dir))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        command = [
            str(Path(sys.executable).parent / "torchserve"),
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config",
            str(self.config),
            "--model-store",
            str(self.model_store),
            *(["--models", *self.models] if self.models else []),
            *self.extra_args,
        ]
        env.update(self.env)
        with open(self.log_dir / "torchserve.out", "ab") as out:
            process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pgid_file.write_text(str(process.pid))
        logger.info("torchserve started (process group %d) in %s", process.pid, self.workdir)

    def keys(self, timeout: float = 60.0) -> Keys:
        """The current keys, waiting for TorchServe to write ``key_file.json`` (empty with token auth off)."""
        if not self.token_auth:
            return Keys("", "", "")
        path = self.workdir / "key_file.json"
        deadline = time.monotonic() + timeout
        while True:
            try:
                return Keys.read(path)
            except (OSError, ValueError, KeyError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} did not appear within {timeout:.0f} s") from None
                self._check_alive()
                time.sleep(0.3)

    def renew(self, kind: str) -> Keys:
        """Replace the ``inference`` or ``management`` key using the API key; return the new keys."""
        keys = self.keys()
        reply = requests.post(
            f"{self.endpoints.url('management')}/token",
            params={"type": kind},
            headers={"Authorization": f"Bearer {keys.api}"},
            timeout=10,
        )
        reply.raise_for_status()
        return self.keys()

    def wait_ready(self, models: Iterable[str], timeout: float = 180.0) -> Keys:
        """Wait until every model has a READY worker (renewing an expired management key); return the keys."""
        keys = self.keys(timeout)
        deadline = time.monotonic() + timeout
        pending = set(models)
        while pending:
            for name in sorted(pending):
                try:
                    reply = requests.get(
                        f"{self.endpoints.url('management')}/models/{name}",
                        headers={"Authorization": f"Bearer {keys.management}"},
                        timeout=5,
                    )
                    if reply.status_code == 400 and "InvalidKeyException" in reply.text:
                        keys = self.renew("management")
                    workers = reply.json()[0].get("workers", []) if reply.status_code == 200 else []
                except (requests.RequestException, ValueError, IndexError, KeyError):
                    workers = []
                if any(w.get("status") == "READY" for w in workers):
                    pending.discard(name)
            if pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"models not ready within {timeout:.0f} s: {sorted(pending)}; see {self.log_dir}"
                    )
                self._check_alive()
                time.sleep(0.5)
        return keys

    def register(self, archive: str, timeout: float = 900.0) -> float:
        """Register ``<archive>.mar`` from the model store with one worker and wait for it (the config must
        enable the model API); return the seconds until its worker was ready."""
        keys = self.renew("management")
        started = time.monotonic()
        reply = requests.post(
            f"{self.endpoints.url('management')}/models",
            params={"url": f"{archive}.mar", "model_name": archive, "initial_workers": "1", "synchronous": "true"},
            headers={"Authorization": f"Bearer {keys.management}"},
            timeout=timeout,
        )
        if reply.status_code != 200:
            try:
                message = reply.json().get("message", reply.text)
            except ValueError:
                message = reply.text
            raise RuntimeError(f"registering {archive}: {reply.status_code} {str(message).strip()[:300]}")
        return time.monotonic() - started

    def unregister(self, name: str, timeout: float = 180.0) -> None:
        """Unregister a model (its workers stop)."""
        keys = self.renew("management")
        requests.delete(
            f"{self.endpoints.url('management')}/models/{name}",
            headers={"Authorization": f"Bearer {keys.management}"},
            timeout=timeout,
        )

    def management_ready(self, timeout: float = 300.0) -> None:
        """Wait until the management API answers (the key file is written before the listeners are up)."""
        deadline = time.monotonic() + timeout
        while True:
            keys = self.keys(timeout)
            try:
                reply = requests.get(
                    f"{self.endpoints.url('management')}/models",
                    headers={"Authorization": f"Bearer {keys.management}"},
                    timeout=5,
                )
                if reply.status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the management API did not answer within {timeout:.0f} s; see {self.log_dir}")
            self._check_alive()
            time.sleep(0.5)

    def pgid(self) -> int | None:
        try:
            return int(self.pgid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def processes(self) -> list[int]:
        """PIDs of every process still in this instance's process group."""
        import psutil

        pgid = self.pgid()
        if pgid is None:
            return []
        found = []
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if os.getpgid(proc.pid) != pgid:
                    continue
            except (ProcessLookupError, PermissionError):
                continue
            if proc.info["status"] == psutil.STATUS_ZOMBIE:  # exited, not yet reaped by its parent: gone
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(proc.pid, os.WNOHANG)  # ours (the frontend we started): reap it
                continue
            found.append(proc.pid)
        return found

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the whole process group (frontend and workers): SIGTERM, then SIGKILL."""
        pgid = self.pgid()
        if pgid is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.processes():
                break
        try:  # reap our direct child if we are its parent (tests); harmless otherwise
            os.waitpid(pgid, os.WNOHANG)
        except ChildProcessError:
            pass
        self.pgid_file.unlink(missing_ok=True)
        logger.info("torchserve stopped (process group %d)", pgid)

    def _check_alive(self) -> None:
        if not self.processes():
            tail = (self.log_dir / "torchserve.out").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"torchserve exited during start-up; last output:\n{tail}")


@contextlib.contextmanager
def started(
    workdir: Path, store: Path, names: Sequence[str], overrides: Mapping[str, str] | None = None
) -> Iterator[TorchServe]:
    """A TorchServe from the shipped ``config.properties`` (free loopback ports, ``overrides`` applied) serving
    ``names`` from ``store``, started in ``workdir`` and always stopped; yields it as soon as it runs."""
    workdir.mkdir(parents=True, exist_ok=True)
    properties = {**random_endpoints().properties(), **(overrides or {})}
    config = derive_config(Path("config.properties"), workdir / "config.properties", properties)
    server = TorchServe(workdir, config, store, [f"{n}={n}.mar" for n in names])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def apply_profile(store: Path, names: list[str], dest: Path, profiles: Path) -> Path:
    """The store to serve: this machine's tuned profile applied to the archives it names (see ``profiles``)."""
    from profiles import profiled_store, this_machine

    served, lines = profiled_store(store, names, dest, this_machine(), profiles)
    for line in lines:
        logger.info("%s", line)
    return served.resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--workdir", type=Path, default=Path("."))
    parser.add_argument("--config", type=Path, default=Path("config.properties"))
    parser.add_argument("--model-store", type=Path, default=Path("model_store"))
    parser.add_argument("--models", nargs="*", default=None, help="archive names (default: every .mar)")
    parser.add_argument("--profiles", type=Path, default=Path("build/tune/profiles"), help="make tune's profiles")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    names = args.models or sorted(p.stem for p in args.model_store.glob("*.mar"))
    server = TorchServe(args.workdir, args.config, args.model_store, [f"{n}={n}.mar" for n in names])
    if args.action == "stop":
        server.stop()
        return 0
    if server.processes():
        logger.info("torchserve is already running in %s; `make stop` first", server.workdir)
        return 1
    server.model_store = apply_profile(args.model_store, names, server.workdir / "profiled-store", args.profiles)
    server.start()
    try:
        server.wait_ready(names)
    except (TimeoutError, RuntimeError):
        server.stop()
        raise
    ep = server.endpoints
    logger.info("TorchServe is ready with models: %s", ", ".join(names))
    logger.info("  REST inference   %s/predictions/<model>", ep.url("inference"))
    logger.info("  REST management  %s/models", ep.url("management"))
    logger.info("  metrics          %s/metrics", ep.url("metrics"))
    logger.info("  gRPC inference   %s   management %s", ep.grpc("inference"), ep.grpc("management"))
    logger.info("  keys             %s (Authorization: Bearer <key>)", server.workdir / "key_file.json")
    logger.info("  logs             %s", server.log_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
