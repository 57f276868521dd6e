"""``make profile-workers [MODEL=<name>]``: where a worker's time goes, the kit's archive beside the stock one's.

Both archives are served by one TorchServe (the shipped config on free loopback ports); each worker is
sampled by ``py-spy record`` (``pip install py-spy``) for 10 s while 16 clients send one image size, and
the samples are summed by what they were doing: the network, JPEG decode, resize and normalize,
TorchServe's protocol, or anything else.
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
import subprocess
import sys
import threading
from pathlib import Path

import demo_models
from bench_run import link_store
from client import KeyRing, RestClient
from loadgen import closed_loop
from tsctl import Keys, TorchServe, derive_config, random_endpoints, worker_pids

logger = logging.getLogger("profile_workers")
# First match wins, on the innermost frames of each sampled stack.
CATEGORIES = (
    ("JPEG decode", re.compile(r"PIL|decode_image|draft|ImageFile|Image\.open|_open")),
    ("resize / crop / normalize", re.compile(r"resize|center_crop|interpolate|normalize|classifier_batch|ToTensor")),
    ("TorchServe protocol", re.compile(r"otf_message|recv|sendall|socket|retrieve_msg|create_predict")),
    ("network", re.compile(r"conv|linear|batch_norm|relu|max_pool|adaptive|addmm|forward|_call_impl")),
)


def categorize(raw: str) -> collections.Counter[str]:
    """Samples per category from py-spy's raw (collapsed) output."""
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        inner = ";".join(stack.split(";")[-6:])
        totals[next((name for name, rx in CATEGORIES if rx.search(inner)), "other")] += int(count)
    return totals


def profile(server: TorchServe, rest: RestClient, name: str, body: bytes, *, out: Path, seconds: int) -> str:
    """One line: the share of each category in ``name``'s worker while 16 clients send ``body``."""
    pid = worker_pids(server.endpoints, Keys.read(server.workdir / "key_file.json"), name)[0]
    load = threading.Thread(
        target=lambda: closed_loop(
            lambda _: rest.predict(name, body).status, concurrency=16, seconds=seconds + 4, warmup=2
        )
    )
    load.start()
    command = ["py-spy", "record", "-p", str(pid), "-d", str(seconds), "-r", "50", "-f", "raw", "-o", str(out)]
    subprocess.run([*command, "--nonblocking", "--threads"], check=True, capture_output=True)
    load.join()
    totals = categorize(out.read_text())
    total = max(1, sum(totals.values()))
    return ", ".join(f"{name_} {100 * count / total:.0f} %" for name_, count in totals.most_common())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/profile"))
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--model", default="resnet18", help="a demo model with a stock archive")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    chelsea = demo_models.sample_photos(("chelsea",))["chelsea"]
    images = {
        "451x300": demo_models.encode(chelsea, "JPEG", quality=90),
        "640x480": demo_models.user_image("photo_640x480.jpg"),
    }
    archives = (args.model, f"{args.model}_stock")
    args.out.mkdir(parents=True, exist_ok=True)
    config = derive_config(Path("config.properties"), args.out / "config.properties", random_endpoints().properties())
    store = link_store(archives, args.out / "store")
    server = TorchServe(args.out, config, store, [f"{a}={a}.mar" for a in archives])
    server.start()
    try:
        server.wait_ready(archives, timeout=300)
        rest = RestClient(server.endpoints, KeyRing(args.out / "key_file.json"))
        for label, body in images.items():
            for name in archives:
                line = profile(server, rest, name, body, out=args.out / f"{name}_{label}.txt", seconds=args.seconds)
                logger.info("%s, %s JPEG, c=16: %s", name, label, line)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
