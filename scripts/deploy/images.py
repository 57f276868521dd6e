"""Build and run the kit's container images (``make image``, ``make image-run``).

``build`` stages a small build context per image under ``build/docker/<image>/`` (hard links: the wheelhouse,
the archives or the Triton repository, the deploy files), runs the legacy builder (``DOCKER_BUILDKIT=0``,
``--network host``, no BuildKit here) with ``BASE_IMAGE``, and records each image's size and build time in
``build/docker/images.json``. ``run`` starts a container on the host's network with every listener moved
to a 127.0.0.1 port (``TS_*`` variables for TorchServe, flags for Triton): nothing binds elsewhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tsctl import Endpoints, free_ports

logger = logging.getLogger("images")
TORCHSERVE_IMAGE = "servekit-torchserve:0.1.0"
TRITON_IMAGE = "servekit-triton:0.1.0"
DEPLOY = Path("deploy")


@dataclass(frozen=True)
class Built:
    """One image as built: its tag, size and how long the build took."""

    tag: str
    size_mb: float
    build_s: float
    base: str


def _link_tree(source: Path, target: Path, suffixes: Sequence[str] = ()) -> None:
    """Hard-link (or copy) ``source`` into ``target``; only files ending in ``suffixes`` when given."""
    for path in sorted(source.rglob("*")):
        dest = target / path.relative_to(source)
        if "__pycache__" in path.parts:
            continue
        if path.is_dir():  # empty folders count: an ensemble's version folder "1/" is one
            if not suffixes:
                dest.mkdir(parents=True, exist_ok=True)
            continue
        if suffixes and not path.name.endswith(tuple(suffixes)):
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:
            shutil.copy2(path, dest)


@dataclass(frozen=True)
class Sources:
    """What the build contexts are made of."""

    wheelhouse: Path
    store: Path
    models: tuple[str, ...]
    repository: Path
    profiles: Path = Path("build/tune/profiles")


def stage(kind: str, context: Path, sources: Sources) -> Path:
    """The build context of the ``torchserve`` or ``triton`` image."""
    wheelhouse, store, models, repository = sources.wheelhouse, sources.store, sources.models, sources.repository
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    _link_tree(wheelhouse, context / "wheelhouse", (".whl", ".tar.gz"))
    _link_tree(DEPLOY, context / "deploy", (".py", ".txt", ".properties", ".Dockerfile"))
    if kind == "torchserve":
        if not models:
            raise SystemExit("images.py: --models names the archives the TorchServe image carries")
        (context / "model-store").mkdir()
        for name in models:
            os.link(store / f"{name}.mar", context / "model-store" / f"{name}.mar")
        # the entrypoint's profile step (stdlib and PyYAML) and make tune's profiles of this host's machines
        (context / "entry" / "servekit").mkdir(parents=True)
        shutil.copy2(Path("scripts/bench") / "profiles.py", context / "entry" / "profiles.py")
        shutil.copy2(Path("handlers") / "servekit" / "host.py", context / "entry" / "servekit" / "host.py")
        (context / "profiles").mkdir()
        for profile in sorted(sources.profiles.glob("*.json")):
            shutil.copy2(profile, context / "profiles" / profile.name)
    else:
        _link_tree(repository, context / "repository")
        (context / "scripts").mkdir()
        for source in ("scripts/deploy/tritonctl.py", "scripts/serve/tsctl.py"):  # flat in the image
            shutil.copy2(source, context / "scripts" / Path(source).name)
    return context


def docker(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    return subprocess.run(["docker", *args], check=check, text=True, capture_output=capture, env=env)


def build(kind: str, tag: str, base: str, context: Path, build_args: Mapping[str, str] | None = None) -> Built:
    """``docker build`` of ``deploy/<kind>.Dockerfile`` on ``base``; returns size and time."""
    args = ["build", "--network", "host", "-f", str(context / "deploy" / f"{kind}.Dockerfile"), "-t", tag]
    for key, value in {"BASE_IMAGE": base, **(build_args or {})}.items():
        args += ["--build-arg", f"{key}={value}"]
    start = time.monotonic()
    docker(*args, str(context))
    seconds = time.monotonic() - start
    if os.environ.get("SERVEKIT_PRUNE_STAGES") == "1":  # CI: drop the wheel stage (~10 GB; it is also the cache)
        docker("image", "prune", "-f", "--filter", "label=servekit.stage=wheels", capture=True)
    size = int(docker("image", "inspect", "--format", "{{.Size}}", tag, capture=True).stdout.strip())
    built = Built(tag, size / 1e6, seconds, base)
    logger.info("%s: %.0f MB, built in %.0f s on %s", tag, built.size_mb, built.build_s, base)
    return built


def torchserve_env(ep: Endpoints) -> dict[str, str]:
    """TS_* overrides putting every TorchServe listener on a 127.0.0.1 port of the host."""
    env = {f"TS_{key.upper()}": value for key, value in ep.properties().items()}
    env["TS_GRPC_INFERENCE_ADDRESS"] = "127.0.0.1"
    return env


def run_torchserve(tag: str, name: str, ep: Endpoints, extra: Sequence[str] = ()) -> None:
    """Start the TorchServe image detached on the host network, loopback ports only."""
    env_args = [a for key, value in torchserve_env(ep).items() for a in ("-e", f"{key}={value}")]
    docker("run", "-d", "--name", name, "--network", "host", *env_args, *extra, tag)


def triton_args(http: int, grpc: int, metrics: int) -> list[str]:
    """Triton's listeners on 127.0.0.1 ports of the host."""
    return [
        "--model-repository=/models",
        "--http-address=127.0.0.1",
        f"--http-port={http}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc}",
        "--metrics-address=127.0.0.1",
        f"--metrics-port={metrics}",
        "--exit-timeout-secs=60",
    ]


def run_triton(tag: str, name: str, ports: Sequence[int], models: Sequence[str] = ()) -> None:
    """Start the Triton image detached on the host network, loopback ports only (``models``: load only those)."""
    only = ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)] if models else []
    docker("run", "-d", "--name", name, "--network", "host", tag, *triton_args(*ports), *only)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("build", "run"))
    parser.add_argument("--base", default="servekit-base:bookworm")
    parser.add_argument("--wheelhouse", type=Path, default=Path("build/wheelhouse"))
    parser.add_argument("--store", type=Path, default=Path("model_store"))
    parser.add_argument(
        "--models", nargs="+", default=["digits", "resnet18", "mobilenet_v3_small", "fasterrcnn", "shapes"]
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository/cpu"))
    parser.add_argument("--which", choices=("torchserve", "triton", "both"), default="both")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kinds = ("torchserve", "triton") if args.which == "both" else (args.which,)
    tags = {"torchserve": TORCHSERVE_IMAGE, "triton": TRITON_IMAGE}
    if args.action == "build":
        report_path = Path("build/docker/images.json")
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        sources = Sources(args.wheelhouse, args.store, tuple(args.models), args.repository)
        for kind in kinds:
            context = stage(kind, Path("build/docker") / kind, sources)
            report[kind] = asdict(build(kind, tags[kind], args.base, context))
        report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        return 0
    kind = kinds[0]
    name = f"servekit-{kind}"
    docker("rm", "-f", name, check=False, capture=True)
    if kind == "torchserve":
        ep = Endpoints(*free_ports(5))
        run_torchserve(tags[kind], name, ep)
        logger.info("container %s: REST %s, gRPC %s", name, ep.url("inference"), ep.grpc("inference"))
        logger.info("keys: docker exec %s cat /tmp/servekit/key_file.json; stop: docker rm -f %s", name, name)
    else:
        ports = free_ports(3)
        run_triton(tags[kind], name, ports)
        logger.info("container %s: HTTP 127.0.0.1:%d, gRPC 127.0.0.1:%d; stop: docker rm -f %s", name, *ports[:2], name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
