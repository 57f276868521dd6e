"""Tuned keys stay with the machine they were measured on: `make tune` writes a per-machine profile, and
the server applies it only on a machine with the same CPU model, kernel flags and cores."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from kit import MODEL_STORE, archive, serving
from profiles import Machine, matching_profile, profile_path, profiled_store, record_choice, this_machine
from tsctl import apply_profile

TUNED = {"batchSize": 3, "maxBatchDelay": 7, "minWorkers": 1, "maxWorkers": 1, "threads": 1}


def test_a_profile_matches_only_its_own_machine(tmp_path: Path) -> None:
    here = this_machine()
    record_choice("digits", TUNED, here, tmp_path)
    assert matching_profile(here, tmp_path) is not None
    for other in (
        Machine(here.cpu_model, here.flags, here.cores + 14),
        Machine(here.cpu_model, (*(f for f in here.flags if f != "avx2"), "amx_tile"), here.cores),
        Machine("Intel(R) Xeon(R) Platinum 8480+", here.flags, here.cores),
    ):
        assert other.key != here.key
        assert matching_profile(other, tmp_path) is None
        store, lines = profiled_store(MODEL_STORE, ["digits"], tmp_path / "store", other, tmp_path)
        assert store == MODEL_STORE and lines[0].startswith("no tuned profile for this machine")
    # a profile copied in from another machine under this machine's file name is not applied either
    profile_path(here, tmp_path).write_text(profile_path(here, tmp_path).read_text().replace(here.cpu_model, "x"))
    assert matching_profile(here, tmp_path) is None


@pytest.mark.e2e
def test_the_server_applies_this_machines_profile_at_registration(tmp_path: Path) -> None:
    archive("digits")
    record_choice("digits", TUNED, this_machine(), tmp_path / "profiles")
    store = apply_profile(MODEL_STORE, ["digits", "resnet18"], tmp_path / "profiled", tmp_path / "profiles")
    assert (store / "resnet18.mar").resolve() == (MODEL_STORE / "resnet18.mar").resolve()  # not in the profile
    with serving(tmp_path / "torchserve", store, ["digits"]) as server:
        reply = requests.get(
            f"{server.endpoints.url('management')}/models/digits",
            headers={"Authorization": f"Bearer {server.keys.management}"},
            timeout=10,
        )
        described = reply.json()[0]
        assert (described["batchSize"], described["maxBatchDelay"]) == (3, 7), described
