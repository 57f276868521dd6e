"""Bring your own model, in process and through `make scaffold`/`make convert`: formats from the bytes,
checkpoints unwrapped, class counts from the weights, batch bounds of traced graphs, one-line errors."""

from __future__ import annotations

import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from kit import REPO
from servekit.checkpoint import check_labels, infer_num_classes, misfit, strip_prefixes, unwrap_checkpoint
from servekit.config import ModelSource, parse_handler_config
from servekit.errors import ConfigError, plain_line
from servekit.loading import compile_module
from servekit.onnx_backend import onnx_input_spec
from servekit.program_backend import (
    BoundedBatch,
    InputSpec,
    aoti_input_spec,
    check_package_cpu,
    exported_input_spec,
)
from servekit.sniff import pickled_classes, sniff_model_file
from servekit.weights import fit_weights, read_weights


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 5)
    ).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny file per format, each under a misleading suffix."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("formats")
    net = small_net()
    paths = {
        name: folder / f"model_{name}.bin"
        for name in ("state_dict", "safetensors", "torchscript", "exported", "onnx", "whole", "legacy")
    }
    torch.save(net.state_dict(), paths["state_dict"])
    torch.save(net.state_dict(), paths["legacy"], _use_new_zipfile_serialization=False)
    save_file(net.state_dict(), str(paths["safetensors"]))
    torch.jit.save(torch.jit.script(net), str(paths["torchscript"]))
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 8, 8),)), str(paths["exported"]))
    torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(paths["onnx"]), dynamo=False)
    torch.save(net, paths["whole"])
    return paths


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("state_dict", "state_dict"), ("legacy", "state_dict"), ("safetensors", "safetensors"),
     ("torchscript", "torchscript"), ("exported", "exported"), ("onnx", "onnx"), ("whole", "state_dict")],
)  # fmt: skip
def test_format_is_found_from_the_content_not_the_suffix(files: dict[str, Path], name: str, fmt: str) -> None:
    assert sniff_model_file(files[name]).format == fmt


def test_unknown_truncated_and_empty_files_get_one_line(tmp_path: Path, files: dict[str, Path]) -> None:
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(files["state_dict"].read_bytes()[:500])
    with pytest.raises(ConfigError, match="cannot tell what random.pt is"):
        sniff_model_file(tmp_path / "random.pt")
    with pytest.raises(ConfigError, match="empty.pt is empty"):
        sniff_model_file(tmp_path / "empty.pt")
    with pytest.raises(ConfigError, match="cut.pt is a damaged or truncated zip archive"):
        sniff_model_file(tmp_path / "cut.pt")
    with pytest.raises(ConfigError, match="does not exist"):
        sniff_model_file(tmp_path / "nope.pt")


def test_a_whole_pickled_model_is_named_and_refused_without_running(files: dict[str, Path]) -> None:
    assert (
        pickled_classes(files["whole"])[0] == "torch.nn.modules.container.Sequential"
        or pickled_classes(files["whole"]) == []
    )
    with pytest.raises(ConfigError) as info:
        read_weights(files["whole"], "state_dict")
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message
    assert message.startswith("refused to load model_whole.bin: it holds pickled Python objects")
    assert message.endswith(f"make convert PT={files['whole']} OUT=<new file> TRUST=1")


def test_plain_line_drops_escape_codes_and_keeps_the_first_line() -> None:
    assert plain_line("\x1b[1m\x1b[31mWeights only load failed.\x1b[0m\nmore\n") == "Weights only load failed."


def test_checkpoint_nesting_and_prefixes_are_unwrapped() -> None:
    state = small_net().state_dict()
    expected = set(state)
    wrapped = {"epoch": 3, "optimizer": {"lr": 0.1}, "model": {f"module.{k}": v for k, v in state.items()}}
    unwrapped = unwrap_checkpoint(wrapped, expected)
    assert set(unwrapped.state) == expected
    assert unwrapped.steps == ("weights under 'model'", "prefix 'module.' stripped")
    ema = {"model_ema": {"module": {f"_orig_mod.module.{k}": v for k, v in state.items()}}}
    assert set(unwrap_checkpoint(ema, expected).state) == expected
    # A prefix that is part of the architecture's own names ('model.' of a model whose keys start so) stays.
    own = {f"model.{k}": v for k, v in state.items()}
    assert strip_prefixes(own, set(own))[1] == []
    with pytest.raises(ConfigError, match=r"holds no state_dict: a dict with keys \['epoch'\]"):
        unwrap_checkpoint({"epoch": 3}, expected)


def test_class_count_comes_from_the_head_and_misfits_are_one_line() -> None:
    import torchvision

    five = torchvision.models.resnet18(weights=None, num_classes=5).state_dict()
    default = torchvision.models.resnet18(weights=None).state_dict()
    assert infer_num_classes(five, default, 1000) == 5
    assert infer_num_classes(default, default, 1000) is None
    line = misfit(five, default, "resnet18")
    assert (
        line
        == "the weights do not fit resnet18: layer 'fc.weight' is [5, 512] in the file but [1000, 512] in the "
        + ("architecture")
    )
    resnet34 = torchvision.models.resnet34(weights=None).state_dict()
    assert misfit(default, resnet34, "resnet34").startswith(
        "the weights do not fit resnet34: 96 of its 218 keys are missing"
    )
    with pytest.raises(
        ConfigError,
        match=r"the labels file has 4 names but the final layer 'fc.weight' has shape \[5, 512\]: 5 classes",
    ):
        check_labels(4, 5, "fc.weight", [5, 512])


def test_fit_weights_sizes_the_head_of_a_torchvision_network(files: dict[str, Path], tmp_path: Path) -> None:
    import torchvision

    model = torchvision.models.efficientnet_b0(weights=None, num_classes=5)
    fitted = fit_weights({"state_dict": model.state_dict()}, tmp_path, ModelSource(architecture="efficientnet_b0"))
    assert fitted.num_classes == 5
    x = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(fitted.model.eval()(x), model.eval()(x))


def test_bounded_batch_chunks_and_pads() -> None:
    calls: list[int] = []

    def run(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x.flatten(1).sum(1, keepdim=True)

    batch = torch.arange(5 * 3 * 2 * 2, dtype=torch.float32).view(5, 3, 2, 2)
    expected = batch.flatten(1).sum(1, keepdim=True)
    for spec, chunks in [
        (InputSpec(1, 1), [1] * 5),
        (InputSpec(1, 2), [2, 2, 1]),
        (InputSpec(2, 2), [2, 2, 2]),
        (InputSpec(2, 8), [5]),
        (InputSpec(), [5]),
    ]:
        calls.clear()
        torch.testing.assert_close(BoundedBatch(run, spec, torch.device("cpu"))(batch), expected)
        assert calls == chunks, spec
    calls.clear()
    BoundedBatch(run, InputSpec(2, 8), torch.device("cpu"))(batch[:1])
    assert calls == [2]  # one image padded to the package's lower bound


def test_input_specs_of_traced_graphs(files: dict[str, Path]) -> None:
    static = exported_input_spec(torch.export.load(str(files["exported"])))
    assert static == InputSpec(1, 1, 8, 8) and static.static_batch
    batch = torch.export.Dim("batch", min=1, max=16)
    dynamic = torch.export.export(small_net(), (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: batch},))
    assert exported_input_spec(dynamic) == InputSpec(1, 16, 8, 8)
    assert onnx_input_spec(["n", 3, 224, 224]) == InputSpec(1, None, 224, 224)
    assert onnx_input_spec([4, 3, 224, 224]) == InputSpec(4, 4, 224, 224)
    assert aoti_input_spec({"servekit_batch": "1-8", "servekit_size": "224x224"}, 8) == InputSpec(1, 8, 224, 224)
    assert aoti_input_spec({}, 0) == InputSpec(1, 1)
    assert aoti_input_spec({}, 8) == InputSpec(2, 8)


def test_an_aoti_package_for_another_cpu_is_refused() -> None:
    check_package_cpu({"AOTI_CPU_ISA": "AVX2"}, {"avx2", "avx"})
    with pytest.raises(ConfigError, match=r"compiled for AVX512 but this CPU lacks \['avx512f'"):
        check_package_cpu({"AOTI_CPU_ISA": "AVX512"}, {"avx2"})


def test_compile_settings_are_typed_and_failures_are_loud() -> None:
    config = parse_handler_config(
        {
            "task": "classification",
            "model": {"architecture": "resnet18"},
            "compile": {"mode": "max-autotune", "dynamic": True},
        }
    )
    assert config.compile is not None and config.compile.mode == "max-autotune" and config.compile.dynamic
    with pytest.raises(ConfigError, match="'handler.compile.mode' must be one of"):
        parse_handler_config(
            {"task": "classification", "model": {"architecture": "resnet18"}, "compile": {"mode": "fast"}}
        )
    with pytest.raises(ConfigError, match="handler.compile applies to classifiers"):
        parse_handler_config({"task": "detection", "model": {"architecture": "fasterrcnn_resnet50_fpn"}, "compile": {}})
    with pytest.raises(ConfigError, match=r"handler.compile \(mode default\) failed"):
        compile_module(
            small_net(),
            parse_handler_config(
                {"task": "classification", "model": {"architecture": "resnet18"}, "compile": {}}
            ).compile,
            [torch.zeros(1, 5)],
        )  # type: ignore[arg-type]


# --- through make, as a user runs it --------------------------------------------------------------


def make(*args: str, **variables: object) -> subprocess.CompletedProcess[str]:
    command = ["make", "--no-print-directory", *args, *(f"{k}={v}" for k, v in variables.items())]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The kit's error line; asserts there is exactly one and no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "\x1b" not in lines[0] and len(lines[0]) < 400
    return lines[0]


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory, files: dict[str, Path]) -> Path:
    import torchvision

    folder = tmp_path_factory.mktemp("user")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    torch.save(
        {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, folder / "ckpt.pth"
    )
    torch.save(model, folder / "whole.pt")
    data = (folder / "ckpt.pth").read_bytes()
    (folder / "cut.pth").write_bytes(data[: len(data) // 3])
    (folder / "noise.pt").write_bytes(bytes(range(251)) * 40)
    (folder / "labels2.txt").write_text("cat\ndog\n")
    return folder


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"TASK": "detection", "PT": "ckpt.pth", "ARCH": "resnet18"},
         "resnet18 is a classification architecture, not detection: use TASK=classification"),
        ({"TASK": "segmentation", "PT": "ckpt.pth", "ARCH": "resnet18"},
         "resnet18 is a classification architecture, not segmentation"),
        ({"TASK": "panoptic", "PT": "ckpt.pth", "ARCH": "resnet18"},
         "TASK must be one of classification, detection, segmentation"),
        ({"TASK": "classification", "PT": "missing.pt", "ARCH": "resnet18"}, "missing.pt does not exist"),
        ({"TASK": "classification", "PT": "ckpt.pth", "ARCH": "resnet50"}, "the weights do not fit resnet50"),
        ({"TASK": "classification", "PT": "ckpt.pth", "ARCH": "resnt18"},
         "unknown torchvision architecture 'resnt18'; did you mean resnet18"),
        ({"TASK": "classification", "PT": "ckpt.pth"}, "holds weights only"),
        ({"TASK": "classification", "PT": "cut.pth", "ARCH": "resnet18"}, "damaged or truncated"),
        ({"TASK": "classification", "PT": "noise.pt", "ARCH": "resnet18"}, "cannot tell what noise.pt is"),
        ({"TASK": "classification", "PT": "whole.pt", "ARCH": "resnet18"}, "make convert PT="),
        ({"TASK": "classification", "PT": "ckpt.pth", "ARCH": "resnet18", "LABELS": "labels2.txt"},
         "the labels file has 2 names but the final layer 'fc.weight' has shape [3, 512]: 3 classes"),
        ({"TASK": "classification", "PT": "ckpt.pth", "ARCH": "resnet18", "TORCHSCRIPT": "1"},
         "TORCHSCRIPT=1 was given but ckpt.pth is a torch.save file"),
    ],
)  # fmt: skip
def test_scaffold_bad_input_gets_one_line(
    user_dir: Path, tmp_path: Path, variables: dict[str, str], message: str
) -> None:
    paths = {k: (str(user_dir / v) if k in ("PT", "LABELS") else v) for k, v in variables.items()}
    result = make("scaffold", MODELS=tmp_path, NAME="mine", **paths)
    assert message in one_line_error(result)
    assert not (tmp_path / "mine").exists(), "a failed scaffold leaves no folder behind"


def test_convert_needs_trust_then_scaffolds(user_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "converted.pt"
    assert "add TRUST=1 only if you vouch" in one_line_error(make("convert", PT=user_dir / "whole.pt", OUT=out))
    result = make("convert", PT=user_dir / "whole.pt", OUT=out, TRUST=1)
    assert result.returncode == 0, result.stderr
    assert "the state_dict of torchvision resnet18 (3 classes)" in result.stdout
    assert zipfile.is_zipfile(out) and sniff_model_file(out).format == "state_dict"
    scaffolded = make("scaffold", MODELS=tmp_path, NAME="converted", TASK="classification", PT=out, ARCH="resnet18")
    assert scaffolded.returncode == 0, scaffolded.stderr
    assert "resnet18, 3 classes" in scaffolded.stdout


def test_help_prints_colour_only_on_a_terminal() -> None:
    result = make("help")
    assert result.returncode == 0 and "scaffold" in result.stdout and "\x1b" not in result.stdout


def test_convert_a_custom_class_to_an_exported_program(tmp_path: Path) -> None:
    """A whole pickled model of the user's own class becomes a torch.export program that scaffolds."""
    import sys

    from user_models import TINY_SOURCE

    (tmp_path / "tiny_net.py").write_text(TINY_SOURCE)
    sys.path.insert(0, str(tmp_path))
    try:
        import tiny_net

        torch.manual_seed(0)
        torch.save(tiny_net.TinyNet(num_classes=3).eval(), tmp_path / "whole_tiny.pt")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tiny_net", None)
    out = tmp_path / "tiny.pt2"
    assert "CODE=<folder holding tiny_net.py>" in one_line_error(
        make("convert", PT=tmp_path / "whole_tiny.pt", OUT=out, TRUST=1, SIZE=64)
    )
    result = make("convert", PT=tmp_path / "whole_tiny.pt", OUT=out, TRUST=1, SIZE=64, CODE=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "a torch.export program of TinyNet (input N x 3 x 64 x 64, batch 1-256)" in result.stdout
    scaffolded = make("scaffold", MODELS=tmp_path / "models", NAME="tiny", TASK="classification", PT=out)
    assert scaffolded.returncode == 0, scaffolded.stderr
    assert "format exported; input 64x64 read from the graph" in scaffolded.stdout
