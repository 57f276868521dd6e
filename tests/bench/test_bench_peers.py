"""make bench-peers: its pure parts (CPU of a real process tree, answers compared, the report's ratios) and the
peers' own files (no kit code, pinned). The peers themselves run in `make bench-peers`, not here: their venv
(LitServe, Ray Serve) is a bench's, never the test suite's."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

import bench_peers
from bench_peers import PEERS_DIR, Answer, Point

BURN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


def test_cpu_of_the_whole_tree_counts_the_grandchild() -> None:
    """A parent that sleeps, its child that burns 0.6 s of CPU and stays: the tree's CPU holds the child's."""
    child = BURN.format(s=0.6) + "time.sleep(30)\n"
    parent = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(30)\n"
    process = subprocess.Popen([sys.executable, "-c", parent])
    try:
        before = bench_peers.tree_cpu_seconds(process.pid)
        deadline = time.monotonic() + 20
        while bench_peers.tree_cpu_seconds(process.pid) - before < 0.5 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert bench_peers.tree_cpu_seconds(process.pid) - before >= 0.5
    finally:
        import psutil

        for p in psutil.Process(process.pid).children(recursive=True):
            p.kill()
        process.kill()
        process.wait()
    assert bench_peers.tree_cpu_seconds(process.pid) == 0.0  # gone: nothing, not an error


def test_answers_compare_by_top1_and_scores() -> None:
    kit = Answer(
        "kit", "a.jpg", 200, bench_peers.top5_of([{"label": "x", "index": 3, "score": 0.5}, {"index": 1, "score": 0.2}])
    )
    same = Answer("litserve", "a.jpg", 200, [(3, 0.49), (1, 0.21)])
    other = Answer("ray serve", "a.jpg", 200, [(1, 0.4), (7, 0.3)])
    assert bench_peers.agreement(kit, same) == (True, 0.010000000000000009)
    assert bench_peers.agreement(kit, other)[0] is False and abs(bench_peers.agreement(kit, other)[1] - 0.2) < 1e-9
    assert bench_peers.top5_of({"error": "x"}) == []


def point(side: str, size: str, round_: int, rate: float, cpu: float, *, layout: str = "2x1") -> Point:
    return Point(side, layout, size, round_, rate, 100.0, 200.0, cpu, 0)


def test_the_report_takes_medians_over_rounds_and_states_the_ratios() -> None:
    size = bench_peers.SIZES[0]
    points = [
        point("kit", bench_peers.SIZES[1], 0, 30.0, 50.0),
        point("kit", bench_peers.SIZES[1], 0, 20.0, 60.0, layout="1x2"),
        point("litserve", bench_peers.SIZES[1], 0, 15.0, 55.0),
        point("litserve", bench_peers.SIZES[1], 0, 5.0, 90.0, layout="1x2"),
        *(point("kit", size, r, rate, 40.0) for r, rate in ((1, 30.0), (2, 34.0), (3, 90.0))),
        *(point("litserve", size, r, rate, 80.0) for r, rate in ((1, 15.0), (2, 17.0), (3, 16.0))),
    ]
    summary = bench_peers.medians(points)
    assert summary[("kit", size)].rate == 34.0 and summary[("kit", size)].round == 3
    report = {
        "model": "resnet18",
        "command": "make bench-peers",
        "date": "2026-12-08",
        "machine": "test",
        "concurrency": 16,
        "seconds": 10.0,
        "warmup": 3.0,
        "rounds": 3,
        "sizes": [size],
        "peers": {"litserve": "LitServe"},
        "layouts": {"kit": "2x1", "litserve": "2x1"},
        "points": [p.__dict__ for p in points],
        "answers": [
            {"side": "kit", "size": size, "status": 200, "top5": [[3, 0.5]]},
            {"side": "litserve", "size": size, "status": 200, "top5": [[3, 0.5]]},
        ],
    }
    text = bench_peers.markdown(report)
    assert f"| {size} | kit | litserve | 2.12x | 0.50 |" in text, text
    assert "| kit | 2x1 | 30.0 | 100 | 200 | 50.0 | **kept** |" in text
    assert f"| {size} | litserve | 200 | yes | 0.0e+00 |" in text


def test_the_peers_are_written_without_kit_code_and_pinned() -> None:
    kit_modules = {"servekit", "tsctl", "client", "loadgen", "demo_models", "bench_peers"}
    for script in ("litserve_app.py", "ray_app.py"):
        tree = ast.parse((PEERS_DIR / script).read_text(encoding="utf-8"))
        imported = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {
            node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not imported & kit_modules, (script, imported)
        assert "127.0.0.1" in (PEERS_DIR / script).read_text(encoding="utf-8")
    pins = [line.split("#")[0].strip() for line in Path(PEERS_DIR / "requirements.txt").read_text().splitlines()]
    assert all("==" in pin for pin in pins if pin), pins
    assert bench_peers.layouts(2) == (bench_peers.Layout(2, 1), bench_peers.Layout(1, 2))
