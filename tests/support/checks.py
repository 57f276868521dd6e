"""Assertions several test folders share: answers equal across servers, detections equal within tolerance, and
a CRD schema made as strict as the API server's field validation."""

from __future__ import annotations

from typing import Any


def assert_same_answer(a: Any, b: Any, tol: float = 1e-5) -> None:
    """Two JSON answers equal but for float noise."""
    if isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= tol, (a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_answer(a[key], b[key], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_answer(x, y, tol)
    else:
        assert a == b


def assert_same_detections(ours: list[dict], theirs: list[dict]) -> None:
    """The same labels in the same order, scores within 1e-4 and boxes within 0.5 px."""
    assert [d["label"] for d in ours] == [d["label"] for d in theirs]
    for a, b in zip(ours, theirs):
        assert abs(a["score"] - b["score"]) <= 1e-4
        assert max(abs(x - y) for x, y in zip(a["box"], b["box"])) <= 0.5


def strict(schema: Any) -> Any:
    """The CRD schema as the API server's strict field validation applies it: unknown fields are errors."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema
