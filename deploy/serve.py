"""Entrypoint of the kit's TorchServe image: TorchServe in the foreground, and a graceful stop.

TorchServe 0.12's frontend has no shutdown hook: a SIGTERM ends the JVM at once and the requests it has
accepted are lost. On SIGTERM (``docker stop``, a pod's termination) this entrypoint keeps TorchServe
running until every request it received has been answered (its ``ts_inference_requests_total`` counter
against the kit handlers' ``ServekitRequests``, from the Prometheus endpoint) and stays so briefly, or
until ``SERVEKIT_DRAIN_SECONDS`` pass; then it stops TorchServe's process group and exits 0.

Before TorchServe starts, a tuned profile for this machine (``make tune``'s choice, a JSON file under
``SERVEKIT_PROFILES``: baked into the image from ``build/tune/profiles/``, or a Kubernetes ConfigMap mounted
over it) is applied to the archives it names, in a store under the work directory; a profile of another
CPU model, flag set or core count is not. One line says which applied, or that the shipped keys serve
(``profiles.py`` beside this file does the work; a profile that cannot be read never stops the models).

``serve.py --health`` is the image's HEALTHCHECK: ``/ping`` with the inference key when token auth is on.
Standard library only: it runs before anything else is known to work.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

WORKDIR = Path(os.environ.get("SERVEKIT_WORKDIR", "/tmp/servekit"))  # the key file and TorchServe's cwd
# folders of tuned profiles, searched in order (a Kubernetes ConfigMap's before the image's own)
PROFILES = [Path(p) for p in (os.environ.get("SERVEKIT_PROFILES") or "/home/model-server/profiles").split(os.pathsep)]
DRAIN_SECONDS = float(os.environ.get("SERVEKIT_DRAIN_SECONDS", "60"))
QUIET_SECONDS = 1.0  # nothing in flight for this long: the answers have gone out
DEFAULT_COMMAND = [
    "torchserve",
    "--start",
    "--foreground",
    "--ncs",
    "--ts-config=/home/model-server/config.properties",
    "--model-store=/home/model-server/model-store",
]
_SAMPLE = re.compile(r"^(\w+)\{([^}]*)\}\s+([0-9.eE+-]+)$", re.M)


def in_flight(metrics_text: str) -> int:
    """Requests TorchServe received that the kit's handlers have not answered yet."""
    received = answered = 0.0
    for name, _labels, value in _SAMPLE.findall(metrics_text):
        if name == "ts_inference_requests_total":
            received += float(value)
        elif name == "ServekitRequests":
            answered += float(value)
    return max(0, round(received - answered))


def properties(path: Path) -> dict[str, str]:
    """A config.properties file as a dict (``key=value`` lines)."""
    out: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def address(command: list[str], key: str, default: str) -> str:
    """A listener's URL from the TS_* override or the --ts-config file, reachable from inside the container."""
    config = next((a.split("=", 1)[1] for a in command if a.startswith("--ts-config=")), "")
    value = properties(Path(config)).get(key, default) if config and Path(config).is_file() else default
    value = os.environ.get(f"TS_{key.upper()}", value)
    return value.replace("0.0.0.0", "127.0.0.1")


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 3.0) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, reply.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


def drain(metrics_url: str, deadline: float) -> None:
    """Wait until nothing is in flight for QUIET_SECONDS, or the deadline."""
    quiet_since: float | None = None
    while time.monotonic() < deadline:
        status, text = get(f"{metrics_url}/metrics")
        busy = status != 200 or in_flight(text) > 0
        now = time.monotonic()
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = now
        elif now - quiet_since >= QUIET_SECONDS:
            return
        time.sleep(0.2)


def model_store(command: list[str]) -> tuple[int, Path] | None:
    """Where ``--model-store`` (``=path`` or ``path`` after it) sits in the command, and its path."""
    for i, arg in enumerate(command):
        if arg.startswith("--model-store="):
            return i, Path(arg.partition("=")[2])
        if arg == "--model-store" and i + 1 < len(command):
            return i + 1, Path(command[i + 1])
    return None


def profiled_command(command: list[str], profiles: list[Path] = PROFILES) -> list[str]:
    """The command with its model store replaced by one where this machine's tuned profile is applied."""
    found = model_store(command)
    if found is None:
        return command
    index, store = found
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from profiles import profile_root, profiled_store, this_machine

        machine, names = this_machine(), sorted(p.stem for p in store.glob("*.mar"))
        root = profile_root(machine, profiles)
        served, lines = profiled_store(store, names, WORKDIR / "profiled-store", machine, root)
    except Exception as exc:  # whatever is wrong with a profile, the shipped keys still serve
        served, lines = store, [f"tuned profiles not applied ({type(exc).__name__}: {exc}): serving the shipped keys"]
    for line in lines:
        sys.stderr.write(f"servekit: {line}\n")
    if served == store:
        return command
    prefix = "--model-store=" if command[index].startswith("--model-store=") else ""
    return [*command[:index], f"{prefix}{served}", *command[index + 1 :]]


def run(command: list[str]) -> int:
    WORKDIR.mkdir(parents=True, exist_ok=True)
    command = profiled_command(command)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda number, _frame: stopping.append(number))
    signal.signal(signal.SIGINT, lambda number, _frame: stopping.append(number))
    server = subprocess.Popen(command, cwd=WORKDIR, start_new_session=True)
    while server.poll() is None and not stopping:
        time.sleep(0.2)
    if not stopping:
        return server.returncode or 1  # TorchServe ended by itself: that is a failure
    metrics_url = address(command, "metrics_address", "http://127.0.0.1:8082")
    sys.stderr.write(f"servekit: signal {stopping[0]}: answering the requests in flight, then stopping\n")
    drain(metrics_url, time.monotonic() + DRAIN_SECONDS)
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    sys.stderr.write("servekit: stopped\n")
    return 0


def health(command: list[str]) -> int:
    """0 when /ping answers 200 (with the inference key when token auth wrote one)."""
    headers = {}
    keys = WORKDIR / "key_file.json"
    if keys.is_file():
        headers["Authorization"] = f"Bearer {json.loads(keys.read_text())['inference']['key']}"
    status, _ = get(f"{address(command, 'inference_address', 'http://127.0.0.1:8080')}/ping", headers)
    return 0 if status == 200 else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["--health"]:
        return health(argv[1:] or DEFAULT_COMMAND)
    return run(argv or DEFAULT_COMMAND)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
