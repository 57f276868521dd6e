"""Loading is safe by default: tensors only, pickled code refused before it runs; labels; threads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from servekit.config import ModelSource
from servekit.errors import ConfigError
from servekit.loading import intra_op_threads, load_labels, load_model
from servekit.weights import read_weights


class _RunsCode:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2), "payload": _RunsCode(marker)}, evil)
    with pytest.raises(
        ConfigError,
        match=r"refused to load model.pt: it is a checkpoint whose metadata holds posix.system, which is not",
    ):
        read_weights(evil, "state_dict")
    assert not marker.exists()


def test_state_dict_with_architecture_and_model_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    torch.save(net.state_dict(), tmp_path / "model.pt")
    (tmp_path / "net.py").write_text(
        "import torch\nclass Net(torch.nn.Sequential):\n"
        "    def __init__(self):\n        super().__init__(torch.nn.Flatten(), torch.nn.Linear(12, 2))\n"
    )
    loaded = load_model(tmp_path, ModelSource(model_file="net.py", model_class="Net"), torch.device("cpu"))
    x = torch.rand(1, 3, 2, 2)
    torch.testing.assert_close(loaded(x), net(x))
    assert not loaded.training
    with pytest.raises(ConfigError, match="model_class 'Nope' is not a class defined in net.py"):
        load_model(tmp_path, ModelSource(model_file="net.py", model_class="Nope"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="unknown torchvision architecture 'resnet9000'"):
        load_model(tmp_path, ModelSource(architecture="resnet9000"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="model file other.pt is missing"):
        load_model(tmp_path, ModelSource(file="other.pt", architecture="resnet18"), torch.device("cpu"))


def test_torchscript(tmp_path: Path) -> None:
    net = torch.jit.script(torch.nn.Linear(3, 2))
    torch.jit.save(net, str(tmp_path / "model.pt"))
    loaded = load_model(tmp_path, ModelSource(format="torchscript"), torch.device("cpu"))
    x = torch.rand(4, 3)
    torch.testing.assert_close(loaded(x), net(x))


def test_labels_list_and_torchserve_mapping(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(["cat", "dog"]))
    (tmp_path / "b.json").write_text(json.dumps({"1": "dog", "0": "cat", "3": ["n01", "fish"]}))
    assert load_labels(tmp_path / "a.json") == ["cat", "dog"]
    assert load_labels(tmp_path / "b.json") == ["cat", "dog", "2", "fish"]
    with pytest.raises(ConfigError, match="labels file c.json is missing"):
        load_labels(tmp_path / "c.json")


@pytest.mark.parametrize(
    ("requested", "workers", "cores", "expected"),
    [(0, 1, 2, 2), (0, 2, 2, 1), (0, 4, 2, 1), (3, 2, 2, 3), (0, 1, 16, 16)],
)
def test_intra_op_threads(requested: int, workers: int, cores: int, expected: int) -> None:
    assert intra_op_threads(requested, workers, cores) == expected


def test_available_cores_follow_the_cgroup_quota(tmp_path: Path) -> None:
    from servekit.host import available_cores

    cpu_max = tmp_path / "cpu.max"
    cores = os.cpu_count() or 1
    assert available_cores(tmp_path / "missing", tmp_path / "missing") == cores
    cpu_max.write_text("max 100000\n")
    assert available_cores(cpu_max, tmp_path / "missing") == cores
    cpu_max.write_text("100000 100000\n")
    assert available_cores(cpu_max) == 1
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs: two threads, never more than the machine has
    assert available_cores(cpu_max) == min(2, cores)
    cpu_max.write_text("garbage\n")
    assert available_cores(cpu_max, tmp_path / "missing") == cores
    v1 = tmp_path / "cpu"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(tmp_path / "missing", v1) == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")  # no limit on cgroup v1
    assert available_cores(tmp_path / "missing", v1) == cores
