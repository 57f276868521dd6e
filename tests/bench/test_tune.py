"""make tune: its pure parts here; one short real sweep on a real TorchServe (e2e)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

import tune
from kit import MODEL_STORE, archive


def test_a_point_rewrites_the_frontend_keys_and_the_handlers_threads() -> None:
    document = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 20, "handler": {"task": "x"}}
    point = tune.Point("digits", workers=2, threads=1, batch=16, delay_ms=5)
    out = tune.tuned_document(document, point)
    assert (out["minWorkers"], out["maxWorkers"], out["batchSize"], out["maxBatchDelay"]) == (2, 2, 16, 5)
    assert out["handler"] == {"task": "x", "threads": 1} and document["handler"] == {"task": "x"}
    assert tune.shipped_point("digits", document, cores=2) == tune.Point("digits", 1, 2, 8, 20)


def test_repack_changes_only_the_model_config(tmp_path: Path) -> None:
    source = archive("digits")
    point = tune.Point("digits", 1, 1, 4, 5)
    copy = tune.repack(source, tmp_path / "x.mar", tune.tuned_document(tune.read_document(source), point))
    with zipfile.ZipFile(source) as a, zipfile.ZipFile(copy) as b:
        assert a.namelist() == b.namelist()
        for name in a.namelist():
            if name != "model-config.yaml":
                assert a.read(name) == b.read(name), name
        assert yaml.safe_load(b.read("model-config.yaml"))["batchSize"] == 4


def _result(rate: float, p99: float, errors: int = 0) -> tune.Result:
    return tune.Result(tune.Point("m", 1, 1, int(rate), 5), "s", rate, p99 / 2, p99, errors)


def test_pick_is_the_fastest_under_the_bound_without_errors() -> None:
    results = [_result(100, 50), _result(150, 120), _result(200, 40, errors=3)]
    assert tune.pick(results, 100).rate == 100
    assert tune.pick(results, None).rate == 150
    assert tune.pick(results, 10) is None


def test_the_sweeps_stay_within_the_cores() -> None:
    best = tune.Point("m", 1, 2, 8, 20)
    assert all(p.workers * p.threads <= 2 for p in tune.worker_points(best, cores=2) if p != best)
    assert {(p.batch, p.delay_ms) for p in tune.batching_points(best)} >= {(1, 5), (16, 50)}
    assert "maxBatchDelay: 20" in tune.advice({"model": "m", "chosen": {**best.__dict__}})


@pytest.mark.e2e
def test_a_short_tune_on_a_real_torchserve(tmp_path: Path) -> None:
    args = ["digits", "--store", str(MODEL_STORE), "--out", str(tmp_path), "--seconds", "1.5", "--warmup", "0.5"]
    assert tune.main([*args, "--p99-ms", "5000"]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    stages = {r["stage"] for r in report["results"]}
    assert stages >= {"variants", "batching", "workers"}
    assert all(r["errors"] == 0 and r["rate"] > 0 for r in report["results"])
    assert report["chosen"] is not None and report["shipped_vs_best_same_archive"] > 0
    assert (tmp_path / "tune.png").stat().st_size > 0 and "(chosen)" in (tmp_path / "results.md").read_text()
