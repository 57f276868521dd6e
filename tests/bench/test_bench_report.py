"""The bench's report of the default path: the plain archive against the stock handler, row by row."""

from __future__ import annotations

from bench_plan import FULL_SERVED, PLAIN_SERVED, PLANS, Row, unique
from bench_report import plain_lines


def test_full_bench_runs_every_plain_row_once() -> None:
    key = lambda s: (s.model, s.server, s.backend, s.archive, s.images)
    full = [key(s) for s in PLANS["full"].served]
    assert len(full) == len(set(full))
    assert {key(s) for s in PLAIN_SERVED} <= set(full)
    assert unique(FULL_SERVED, FULL_SERVED) == unique(FULL_SERVED)


def test_a_plain_archive_slower_than_stock_shows_as_a_row_below_one() -> None:
    rows = [
        Row("resnet18", "stock", "torch", "same", 16, 40.0),
        Row("resnet18", "kit", "torch", "same", 16, 50.0),
        Row("resnet18", "kit", "int8", "same", 16, 120.0),  # not the plain archive: not compared
        Row("mobilenet_v3_small", "stock", "torch", "phone", 16, 10.0),
        Row("mobilenet_v3_small", "kit", "torch", "phone", 16, 9.0),
    ]
    table = [line for line in plain_lines(rows) if line.startswith("| ") and "req/s" not in line]
    assert table == [
        "| resnet18 | 451x300 JPEG | 40.0 | 50.0 | 1.25x |",
        "| mobilenet_v3_small | 4032x3024 JPEG | 10.0 | 9.0 | 0.90x **below stock** |",
    ]
