"""The torch_int8 variant's file: pt2e int8 (torchao's X86 quantizer) saved as a program that the kit's
``exported`` backend loads (torchao's ops registered from the file's own graph) and that answers as the
in-process int8 graph does, batches of one and batches over the saved minimum alike."""

from __future__ import annotations

from pathlib import Path

import torch

from servekit.program_backend import holds_quantized_ops, load_exported
from torch_int8 import MIN_BATCH, Program, calibrated, save_program
from variant_kinds import KINDS, kind_document


def small_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    ).eval()


def test_int8_program_loads_in_the_kit_and_answers_as_the_int8_graph(tmp_path: Path) -> None:
    net = small_net()
    batches = [torch.rand(8, 3, 16, 16) for _ in range(4)]
    quantized = calibrated(net, (16, 16), 8, batches)
    path = tmp_path / "model.int8.pt2"
    saved = save_program(quantized, (16, 16), 8, path, batches[0])
    assert saved.max_abs_diff == 0.0
    assert holds_quantized_ops(path)
    fp32 = tmp_path / "program.pt2"
    torch.export.save(torch.export.export(net, (torch.rand(2, 3, 16, 16),)), str(fp32))
    assert not holds_quantized_ops(fp32)

    served = load_exported(path, torch.device("cpu"))
    assert (served.spec.min_batch, served.spec.max_batch) == (MIN_BATCH, 8)
    reference = Program(quantized, 8).eval()
    x = torch.rand(5, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(served(x), reference(x))
        assert torch.equal(served(x[:1]), reference(x[:1]))  # a single image, padded to the program's minimum
        y = torch.rand(11, 3, 16, 16)  # over the program's maximum: in chunks
        assert torch.equal(served(y), torch.cat([reference(y[:8]), reference(y[8:])]))
        # int8 really: close to fp32, not equal to it
        assert 0 < float((reference(x) - net(x)).abs().max()) < 0.1 * float(net(x).abs().max()) + 0.05


def test_the_variant_serves_the_file_compiled_once_for_every_batch() -> None:
    document = {"batchSize": 8, "handler": {"task": "classification", "model": {"file": "model.pt"}}}
    served = kind_document(document, KINDS["torch_int8"], Path("model.int8.pt2"))
    assert served["handler"]["model"] == {"file": "model.int8.pt2", "format": "exported"}
    assert served["handler"]["compile"] == {"mode": "default", "dynamic": True, "freezing": True}
    assert served["startupTimeout"] >= 600
