"""The zoo sweep (``make test-zoo``; ``tests/support/zoo_sweep.py`` holds the cases): every architecture is saved
as its zoo saves it, scaffolded, archived by the Makefile and served by one real TorchServe, and each answer on
four JPEG photos is compared with the owner's own pipeline run here. A case holds, differs (with its worst
difference) or is refused at scaffold with one line; the table is printed and written to build/zoo-sweep.md.
``make test`` serves the CI selection (``zoo_sweep.CI_NAMES``), ``make test-zoo`` every case (``ZOO_SWEEP=all``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zoo_sweep

from kit import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.zoo]

# what scaffold refuses, on purpose, and the words its one line must hold
REFUSED = {
    "hf_pp_doclayout_v3_det": "PaddleOCR document-layout or text detector",
    "hf_pp_ocrv5_mobile_det_det": "PaddleOCR document-layout or text detector",
}


def test_every_architecture_answers_as_its_owner_or_is_refused_in_one_line(tmp_path: Path) -> None:
    which = os.environ.get("ZOO_SWEEP", "ci")
    rows = zoo_sweep.run_sweep(zoo_sweep.selected(which), tmp_path)
    text = zoo_sweep.table(rows)
    out = REPO / "build" / "zoo-sweep.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
    print("\n" + text)
    assert len(rows) >= (60 if which == "all" else len(zoo_sweep.CI_NAMES))
    tasks = {("torchvision", t) for t in ("classification", "detection", "segmentation")}
    assert {(r.zoo, r.task) for r in rows} >= {
        *tasks,
        ("timm", "classification"),
        *(("transformers", t) for t in ("segmentation", "detection")),
    }
    for row in rows:
        if row.verdict == "refused":
            assert row.name in REFUSED and REFUSED[row.name] in row.line, row
            assert "\n" not in row.line and "Traceback" not in row.line
        else:
            assert row.verdict == "holds", row
