"""``make variants MODEL=<name> DATA=<path> [BUDGET=0.01]``: every variant the kit can build for a model folder
on this machine, each measured through one real TorchServe by its task metric and its speed; the fastest one
within the budget becomes the folder's choice, which ``make archive`` then builds.

For each kind (``variant_kinds.KINDS``: eager, ONNX Runtime fp32 and int8, OpenVINO fp32 and int8, bf16 where
the CPU has it, AOTInductor, torch.compile, torch-native pt2e int8 compiled at load) the variant is built
under ``build/variants/<name>/<kind>/``, archived as ``<name>_<kind>.mar``, registered alone on the server (its
load time), sent the scored split of
DATA (the task metric, as ``make eval``), then loaded closed-loop at ``--concurrency`` for ``--seconds`` on the
same images (req/s, p50/p99) while its worker's peak RSS is read; then unregistered. A variant that fails to
build or to load is a row with its one-line reason, never the end of the sweep.

int8 is calibrated on a split of DATA disjoint from the scored one (every file whose path hashes into the
first ``--calibration-share``). When plain int8 misses the budget on the calibration split, it is quantized
again with its most sensitive layers kept in float: for ONNX Runtime a per-layer ranking (each layer
quantized alone, the output's signal-to-noise against fp32) and ``nodes_to_exclude``, for OpenVINO NNCF's
``quantize_with_accuracy_control``; until the budget holds or nothing is left to gain. The report names the
layers that stayed float.

Writes ``build/variants/<name>/report.md``, ``variants.json`` and ``pareto.png`` (metric against req/s, the
front drawn, the budget line shown), and records the choice in ``models/<name>/variant.yaml``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from cli import error_line
from client import Reply
from eval_data import DataError, Dataset, load_dataset, split
from evaluate import machine, score, send_all
from servekit.config import ClassifierConfig, DetectorConfig, parse_handler_config, read_model_document
from servekit.errors import ConfigError, status_of
from variant_kinds import KINDS, Kind, kind_document, write_choice

logger = logging.getLogger("variants")
DEFAULT_KINDS = tuple(KINDS)
ARCHIVER_TIMEOUT = 900
WEIGHTED = ("Conv", "Gemm", "MatMul", "ConvTranspose")  # the layers int8 quantizes, and may keep in float


# ---------------------------------------------------------------------------------------------- in process


def service_for(folder: Path, document: Mapping[str, Any]) -> Any:
    """The kit's service for ``document`` (a folder's model-config, maybe a variant's), paths under ``folder``
    unless absolute: what a worker runs, in this process."""
    from servekit.service import build_service

    handler = dict(document["handler"])
    handler["labels"] = str((folder / handler.get("labels", "labels.json")).resolve())
    config = parse_handler_config(handler)
    return build_service(config, folder, torch.device("cpu"), max_batch=int(document.get("batchSize", 8)))


def answers_in_process(service: Any, dataset: Dataset, batch: int = 8) -> list[Reply]:
    """The service's answers to the dataset's files, in batches as a worker gets them, as replies."""
    replies: list[Reply] = []
    paths = [s.path for s in dataset.samples]
    for start in range(0, len(paths), batch):
        outcome = service.handle([{"body": p.read_bytes()} for p in paths[start : start + batch]])
        for answer in outcome.answers:
            if isinstance(answer, BaseException):
                replies.append(Reply(status_of(answer), {"error": str(answer), "code": status_of(answer)}))
            else:
                replies.append(Reply(200, answer))
    return replies


@dataclass(frozen=True)
class Calibration:
    """Eager's metric on the calibration split and the float batches its network received there."""

    metric: float
    inputs: list[torch.Tensor]


def calibrate(folder: Path, document: Mapping[str, Any], dataset: Dataset, blank: bool = False) -> Calibration:
    """One eager pass over the calibration split: its metric, and the batches the network itself receives
    (the kit's own preprocessing, recorded at the model call) to calibrate int8 on; ``blank`` calibrates on
    grey images instead (a deliberately broken int8, for the tests and to show what bad calibration costs)."""
    service = service_for(folder, document)
    seen: list[torch.Tensor] = []
    network = service.model

    def recorder(batch: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(batch.detach().float().contiguous().cpu())
        return network(batch, *args, **kwargs)

    service.model = recorder
    metric = score(dataset, answers_in_process(service, dataset)).scores.value
    return Calibration(metric, [torch.zeros_like(t) for t in seen] if blank else seen)


def inprocess_metric(folder: Path, document: Mapping[str, Any], dataset: Dataset) -> float:
    """The headline metric of ``document``'s model on ``dataset``, in process."""
    return score(dataset, answers_in_process(service_for(folder, document), dataset)).scores.value


# ---------------------------------------------------------------------------------------------- int8


def quantized_nodes(path: Path) -> tuple[list[str], list[str]]:
    """(quantized, float) names of a QDQ graph's computing nodes. A weighted layer (Conv, Gemm, MatMul) is
    quantized when its weight comes from a DequantizeLinear (through shape-only ops); another node when any
    input does. The float list names the weighted layers left float."""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {out: node for node in graph.node for out in node.output}

    def dequantized(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type in ("Reshape", "Transpose", "Identity", "Unsqueeze") and node.input:
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    quantized, kept = [], []
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        weighted = node.op_type in WEIGHTED and len(node.input) > 1
        if dequantized(node.input[1]) if weighted else any(dequantized(i) for i in node.input):
            quantized.append(node.name)
        elif weighted:
            kept.append(node.name)
    return quantized, kept


def first_outputs(graph: Path, inputs: Sequence[torch.Tensor]) -> list[Any]:
    """The graph's first output on each input batch (ONNX Runtime, CPU, the process's threads)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [session.run(None, {name: batch.numpy()})[0] for batch in inputs]


def output_sqnr(reference: Sequence[Any], candidate: Sequence[Any]) -> float:
    """Signal-to-noise (dB) of a candidate's outputs against the reference outputs of the same batches."""
    signal = noise = 0.0
    for a, b in zip(reference, candidate):
        signal += float((a.astype("float64") ** 2).sum())
        noise += float(((a - b).astype("float64") ** 2).sum())
    return 10 * math.log10(signal / noise) if noise > 0 else float("inf")


def sensitivity_ranking(
    fp32: Path, quantized: Sequence[str], inputs: Sequence[torch.Tensor], work: Path
) -> list[tuple[str, float]]:
    """Each node the full int8 graph quantizes, quantized alone (``nodes_to_quantize``), ranked by the
    signal-to-noise of the output against fp32 on a few calibration batches, the most sensitive (lowest)
    first. Alone, not reverted one at a time: a chain of quantized ops (a detector's box decode) loses as
    much with any one of them reverted, but each of them alone shows what it costs."""
    from quantize_onnx import quantize_graph

    sample = list(inputs)[:2]
    reference = first_outputs(fp32, sample)  # fp32's outputs once, not once per node
    ranking = []
    for node in quantized:
        single = quantize_graph(fp32, work / "single.onnx", sample, nodes_to_quantize=[node])
        ranking.append((node, output_sqnr(reference, first_outputs(single, sample))))
    (work / "single.onnx").unlink(missing_ok=True)
    return sorted(ranking, key=lambda item: item[1])


def fewest_float(count: int, holds: Callable[[int], float], floor: float) -> tuple[int, float]:
    """The fewest of ``count`` ranked layers to keep float so that ``holds(k)`` (the metric with the first k
    float) reaches ``floor``: k = 1, 2, 4, ... until it holds, then bisected between the last miss and the
    first hold. Returns (k, its metric); k is the best tried when nothing holds."""
    tried: dict[int, float] = {}
    k, miss = 1, 0
    while True:
        tried[k] = holds(k)
        if tried[k] >= floor or k == count:
            break
        miss, k = k, min(count, 2 * k)
    if tried[k] >= floor:
        hit = k
        while hit - miss > 1:
            mid = (hit + miss) // 2
            tried[mid] = holds(mid)
            hit, miss = (mid, miss) if tried[mid] >= floor else (hit, mid)
        return hit, tried[hit]
    best = max(tried, key=lambda n: (tried[n], -n))
    return best, tried[best]


@dataclass
class Int8Result:
    file: Path
    float_layers: list[str] = field(default_factory=list)
    calibration_metric: float = float("nan")
    note: str = ""


def ort_int8_within(
    fp32: Path,
    target: Path,
    *,
    inputs: Sequence[torch.Tensor],
    measure: Callable[[Path], float],
    floor: float,
    accuracy_control: bool = True,
) -> Int8Result:
    """ONNX Runtime int8 of ``fp32``; when its calibration-split metric is under ``floor``, the fewest of the
    most sensitive nodes (:func:`sensitivity_ranking`) stay float (``nodes_to_exclude``) that make it hold,
    or, when nothing does, the count that came closest."""
    from quantize_onnx import quantize_graph

    quantize_graph(fp32, target, inputs)
    value = measure(target)
    result = Int8Result(target, [], value, f"plain int8 {value:.4f} on the calibration split")
    if value >= floor or not accuracy_control:
        return result
    ranking = [node for node, _ in sensitivity_ranking(fp32, quantized_nodes(target)[0], inputs, target.parent)]

    def metric_with(count: int) -> float:
        quantize_graph(fp32, target, inputs, nodes_to_exclude=ranking[:count])
        value = measure(target)
        logger.info("  int8 with %d of %d nodes in float: %.4f (floor %.4f)", count, len(ranking), value, floor)
        return value

    count, value = fewest_float(len(ranking), metric_with, floor)
    quantize_graph(fp32, target, inputs, nodes_to_exclude=ranking[:count])
    held = "holds" if value >= floor else "misses"
    note = (
        f"plain int8 {result.calibration_metric:.4f}; with the {count} most sensitive of {len(ranking)} quantized "
        f"nodes in float {value:.4f} ({held} the budget on the calibration split)"
    )
    return Int8Result(target, ranking[:count], value, note)


def nncf_int8_within(
    fp32: Path,
    target: Path,
    *,
    inputs: Sequence[torch.Tensor],
    measure: Callable[[Path], float],
    floor: float,
    budget: float,
    accuracy_control: bool = True,
) -> Int8Result:
    """NNCF int8 of the ONNX graph (served by OpenVINO); when plain int8 is under ``floor`` on the calibration
    split, NNCF's ``quantize_with_accuracy_control`` reverts the most sensitive quantizers to float."""
    import nncf
    import onnx

    logging.getLogger("nncf").setLevel(logging.WARNING)
    model = onnx.load(str(fp32))
    name = model.graph.input[0].name
    batches = [t.numpy() for t in inputs]
    calibration = nncf.Dataset(batches, lambda b: {name: b})
    size = len(batches)  # items are batches
    quantized = nncf.quantize(model, calibration, subset_size=size)
    onnx.save(quantized, str(target))
    value = measure(target)
    result = Int8Result(target, [], value, f"plain int8 {value:.4f} on the calibration split")
    if value >= floor or not accuracy_control:
        result.float_layers = quantized_nodes(target)[1]
        return result

    def validate(candidate: Any, items: Any) -> tuple[float, None]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "candidate.onnx"
            onnx.save(candidate, str(path))
            return measure(path), None

    validation = nncf.Dataset([0], lambda _: {name: batches[0]})  # the metric is computed by `validate` on the split
    quantized = nncf.quantize_with_accuracy_control(
        model, calibration, validation, validate, max_drop=budget, subset_size=size
    )
    onnx.save(quantized, str(target))
    value = measure(target)
    floats = quantized_nodes(target)[1]
    note = f"plain int8 {result.calibration_metric:.4f}; NNCF accuracy control: {len(floats)} layers float, {value:.4f}"
    return Int8Result(target, floats, value, note)


# ---------------------------------------------------------------------------------------------- building


@dataclass
class Built:
    """A built variant: its archive (or why there is none) and what building it found."""

    kind: Kind
    archive: Path | None = None
    file: Path | None = None
    reason: str = ""
    float_layers: list[str] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Plan:
    """One ``make variants`` run: the folder, its data splits, where everything goes, the budget."""

    name: str
    models: Path
    calibration: Dataset
    scored: Dataset
    work: Path
    budget: float
    relative: bool = False
    blank_calibration: bool = False
    accuracy_control: bool = True

    @property
    def folder(self) -> Path:
        return self.models / self.name

    @property
    def store(self) -> Path:
        return self.work / "store"

    def kind_dir(self, kind: str) -> Path:
        path = self.work / kind
        path.mkdir(parents=True, exist_ok=True)
        return path

    def floor(self, baseline: float) -> float:
        return baseline * (1 - self.budget) if self.relative else baseline - self.budget


def supports(kind: Kind, document: Mapping[str, Any]) -> str:
    """Why ``kind`` cannot be built for this folder on this machine, or empty."""
    from servekit.host import cpu_flags

    config = parse_handler_config(document["handler"])
    classifier = isinstance(config, ClassifierConfig)
    raw_detector = isinstance(config, DetectorConfig) and config.output == "yolo"
    if kind.format == "openvino" and not (classifier or raw_detector):
        return "format openvino serves classifiers and raw-output (yolo) detectors"
    if kind.name in ("aoti", "compile", "torch_int8") and not classifier:
        return f"{kind.name} is offered for classifiers"
    if kind.name in ("aoti", "torch_int8") and config.model.format not in ("state_dict", "safetensors", "exported"):
        return f"{kind.name} builds from state_dict, safetensors or exported folders; this is {config.model.format}"
    if kind.format == "executorch":
        from export_pte import refusal

        why = refusal("this folder", config)
        if why:
            return why
    if kind.precision == "bf16" and not ({"avx512_bf16", "amx_bf16"} & cpu_flags()):
        return "bf16 needs a CPU with AVX512-BF16 or AMX; this one has neither"
    return ""


def build_file(plan: Plan, kind: Kind, document: Mapping[str, Any], calibration: Callable[[], Calibration]) -> Built:
    """Build ``kind``'s file under ``build/variants/<name>/<kind>/`` (an ONNX export first where it needs one)."""
    from export_onnx import export

    built = Built(kind)
    if kind.file is None:
        return built
    target = plan.kind_dir(kind.name) / kind.file
    if kind.format in ("onnx", "openvino"):
        onnx_dir = plan.work / "onnx-export"
        fp32 = onnx_dir / plan.name / "model.onnx"
        if not fp32.is_file():
            check = export(plan.name, plan.models, onnx_dir)
            if not check.ok():
                raise ConfigError(
                    f"the ONNX export is out of tolerance (max |prob diff| {check.max_abs_probability:.1e})"
                )
        if kind.int8:
            built = int8_variant(plan, kind, document, fp32=fp32, target=target, calibration=calibration)
        else:
            target.write_bytes(fp32.read_bytes())
    elif kind.format == "aoti":
        from compile_aoti import compile_package

        line = compile_package(plan.name, plan.models, plan.work / "aoti-build")
        target.write_bytes((plan.work / "aoti-build" / plan.name / "model.pt2").read_bytes())
        built.note = line.split(";")[0]
    elif kind.name == "torch_int8":
        built = torch_int8_variant(plan, kind, document, target, calibration)
    elif kind.format == "executorch":
        from export_pte import build_pte

        inputs = calibration().inputs if kind.int8 else None
        report, _ = build_pte(plan.name, plan.models, plan.work / "pte-build", int8=kind.int8, calibration=inputs)
        target.write_bytes(Path(report.program).read_bytes())
        source = f"calibrated on {len(plan.calibration.samples)} calibration files; " if kind.int8 else ""
        built.note = f"{source}XNNPACK: {report.lowered}; in process: {report.latency.describe()}"
    built.file = target
    return built


def torch_int8_variant(
    plan: Plan, kind: Kind, document: Mapping[str, Any], target: Path, calibration: Callable[[], Calibration]
) -> Built:
    """pt2e int8 (torchao's X86 quantizer) of the folder's network, calibrated on the calibration split."""
    from servekit.loading import load_model
    from torch_int8 import quantize_to_file

    config = parse_handler_config(document["handler"])
    model = load_model(plan.folder, config.model, torch.device("cpu"))
    calibrated_on = calibration()
    batch_size = int(document.get("batchSize", 1))
    saved = quantize_to_file(model, config.input_size, batch_size, calibrated_on.inputs, target)
    calibrated = "blank images" if plan.blank_calibration else f"{len(plan.calibration.samples)} calibration files"
    note = (
        f"pt2e X86 int8 calibrated on {calibrated}; eager {calibrated_on.metric:.4f} on that split; "
        f"saved program vs the in-process int8 graph: max |logit diff| {saved.max_abs_diff:.1e}"
    )
    return Built(kind, None, target, "", [], note)


def int8_variant(
    plan: Plan,
    kind: Kind,
    document: Mapping[str, Any],
    *,
    fp32: Path,
    target: Path,
    calibration: Callable[[], Calibration],
) -> Built:
    """int8 calibrated on the calibration split, kept within the budget there (against eager's metric on it)."""
    calibrated_on = calibration()
    floor = plan.floor(calibrated_on.metric)
    inputs = calibrated_on.inputs

    def measure(path: Path) -> float:
        variant = kind_document(document, kind, path)
        variant["handler"]["model"]["file"] = str(path.resolve())
        return inprocess_metric(plan.folder, variant, plan.calibration)

    if kind.format == "openvino":
        result = nncf_int8_within(
            fp32,
            target,
            inputs=inputs,
            measure=measure,
            floor=floor,
            budget=plan.budget,
            accuracy_control=plan.accuracy_control,
        )
    else:
        result = ort_int8_within(
            fp32, target, inputs=inputs, measure=measure, floor=floor, accuracy_control=plan.accuracy_control
        )
    calibrated = "blank images" if plan.blank_calibration else f"{len(plan.calibration.samples)} calibration files"
    note = f"calibrated on {calibrated}; eager {calibrated_on.metric:.4f} on that split; {result.note}"
    return Built(kind, None, target, "", result.float_layers, note)


def archive(plan: Plan, kind: Kind, file: Path | None) -> Path:
    """``<name>_<kind>.mar`` in the plan's store (torch-model-archiver in a private TMPDIR)."""
    from archive_args import archiver_args

    name = f"{plan.name}_{kind.name}"
    tmp = plan.work / "archiver-tmp" / name
    tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
    words = archiver_args(
        plan.name,
        plan.models,
        Path("handlers"),
        plan.work / "stage",
        plan.store,
        kind=kind.name,
        built=plan.work.parent,
        archive_name=name,
    )
    plan.store.mkdir(parents=True, exist_ok=True)
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    env = {**os.environ, "TMPDIR": str(tmp.resolve())}
    done = subprocess.run([str(archiver), *words], env=env, capture_output=True, text=True, timeout=ARCHIVER_TIMEOUT)
    if done.returncode != 0:
        raise ConfigError(f"torch-model-archiver failed: {(done.stderr or done.stdout).strip()[-300:]}")
    return plan.store / f"{name}.mar"


def build(plan: Plan, kind: Kind, document: Mapping[str, Any], calibration: Callable[[], Calibration]) -> Built:
    """Build and archive one variant; a failure is the row's reason."""
    started = time.perf_counter()
    reason = supports(kind, document)
    if reason:
        return Built(kind, reason=f"not built: {reason}")
    try:
        built = build_file(plan, kind, document, calibration)
        built.archive = archive(plan, kind, built.file)
    except Exception as exc:  # one row, one line; the sweep goes on
        return Built(kind, reason=f"build failed: {error_line(exc, f'build {kind.name}').removeprefix('error: ')}")
    built.seconds = time.perf_counter() - started
    return built


# ---------------------------------------------------------------------------------------------- measuring


@dataclass
class Row:
    """One variant's line of the table."""

    kind: str
    status: str  # "measured", or why not ("not built: ...", "build failed: ...", "load failed: ...")
    metric: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    rejected: int = 0
    req_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    archive_mb: float | None = None
    rss_mb: float | None = None
    load_s: float | None = None
    float_layers: list[str] = field(default_factory=list)
    note: str = ""
    within: bool = False


def peak_rss_mb(pids: Sequence[int]) -> float:
    """The largest peak resident set (VmHWM) of the processes, in MB."""
    peak = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
    return peak / 1024


@contextlib.contextmanager
def management_server(store: Path, workdir: Path) -> Iterator[Any]:
    """A real TorchServe from the shipped config with the model API on and no model loaded; always stopped."""
    from tsctl import started

    with started(workdir, store, [], {"enable_model_api": "true", "load_models": ""}) as server:
        server.management_ready()
        yield server


def measure(server: Any, built: Built, plan: Plan, *, seconds: float, concurrency: int) -> Row:
    """Register one variant alone, score it on the scored split, load it closed-loop, read its worker's peak
    RSS, unregister it."""
    from client import KeyRing, RestClient
    from loadgen import closed_loop
    from tsctl import worker_pids

    assert built.archive is not None
    name = built.archive.stem
    row = Row(built.kind.name, "measured", float_layers=built.float_layers, note=built.note)
    row.archive_mb = built.archive.stat().st_size / 1e6
    try:
        row.load_s = server.register(name)
    except Exception as exc:
        row.status = f"load failed: {error_line(exc, f'load {name}').removeprefix('error: ')}"
        return row
    try:
        client = RestClient(server.endpoints, KeyRing(server.workdir / "key_file.json"))
        outcome = score(plan.scored, send_all(client.predict, name, plan.scored, 8, label=name))
        row.metric, row.metrics, row.rejected = outcome.scores.value, outcome.scores.metrics, len(outcome.rejected)
        payloads = [s.path.read_bytes() for s in plan.scored.samples[:64]]
        load = closed_loop(
            lambda i: client.predict(name, payloads[i % len(payloads)]).status,
            concurrency=concurrency,
            seconds=seconds,
            warmup=min(3.0, seconds / 3),
        )
        row.req_s, row.p50_ms, row.p99_ms = load.rate, load.percentile(50), load.percentile(99)
        row.rss_mb = peak_rss_mb(worker_pids(server.endpoints, server.keys(), name))
    except Exception as exc:
        row.status = f"failed: {error_line(exc, f'measure {name}').removeprefix('error: ')}"
    finally:
        server.unregister(name)
    return row


def choose(rows: Sequence[Row], plan: Plan) -> tuple[Row | None, float | None]:
    """The fastest measured variant whose metric is within the budget of eager's; and the floor."""
    eager = next((r for r in rows if r.kind == "eager" and r.metric is not None), None)
    if eager is None:
        return None, None
    floor = plan.floor(float(eager.metric))  # type: ignore[arg-type]
    for row in rows:
        row.within = row.metric is not None and row.req_s is not None and row.metric >= floor - 1e-12
    candidates = [r for r in rows if r.within]
    return max(candidates, key=lambda r: r.req_s or 0.0), floor


# ---------------------------------------------------------------------------------------------- report


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows: Sequence[Row], headline: str, chosen: Row | None, eager_rate: float | None) -> list[str]:
    lines = [
        f"| variant | {headline} | req/s | x eager | p50 ms | p99 ms | archive MB | peak RSS MB | load s "
        "| float layers | |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.status != "measured":
            lines.append(f"| {r.kind} | - | - | - | - | - | - | - | - | - | {r.status} |")
            continue
        ratio = r.req_s / eager_rate if r.req_s and eager_rate else None
        rejected = f"; {r.rejected} rejected" if r.rejected else ""
        mark = "**chosen**" if r is chosen else ("within budget" if r.within else "over budget")
        floats = str(len(r.float_layers)) if r.float_layers else ("0" if "int8" in r.kind else "-")
        lines.append(
            f"| {r.kind} | {fmt(r.metric, '.4f')} | {fmt(r.req_s, '.1f')} | {fmt(ratio, '.2f')} "
            f"| {fmt(r.p50_ms, '.0f')} | {fmt(r.p99_ms, '.0f')} | {fmt(r.archive_mb, '.1f')} | {fmt(r.rss_mb, '.0f')} "
            f"| {fmt(r.load_s, '.1f')} | {floats} | {mark}{rejected} |"
        )
    return lines


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both req/s (x) and metric (y), by increasing x."""
    front = [p for p in points if not any(q != p and q[0] >= p[0] and q[1] >= p[1] for q in points)]
    return sorted(front)


def draw_pareto(rows: Sequence[Row], headline: str, floor: float | None, chosen: Row | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.metric is not None and r.req_s]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in measured:
        colour = "#2ca02c" if r is chosen else ("#1f77b4" if r.within else "#d62728")
        ax.scatter(r.req_s, r.metric, color=colour, s=40, zorder=3)
        ax.annotate(r.kind, (r.req_s, r.metric), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = pareto_front([(float(r.req_s), float(r.metric)) for r in measured])  # type: ignore[arg-type]
    if len(front) > 1:
        ax.plot([p[0] for p in front], [p[1] for p in front], color="#7f7f7f", linestyle="--", zorder=2, label="front")
    if floor is not None:
        ax.axhline(floor, color="#ff7f0e", linewidth=1, label=f"budget: {headline} >= {floor:.4f}")
    ax.set_xlabel("req/s (served, closed loop)")
    ax.set_ylabel(f"{headline} (served, scored split)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_lines(plan: Plan, rows: Sequence[Row], headline: str, chosen: Row | None, floor: float | None) -> list[str]:
    eager = next((r for r in rows if r.kind == "eager"), None)
    budget = f"{plan.budget:g} {'relative' if plan.relative else 'absolute'}"
    lines = [
        f"# Variants of {plan.name}",
        "",
        f"- machine: {machine()}",
        f"- data: `{plan.scored.root}` ({plan.scored.layout}); scored {len(plan.scored.samples)} files (sha256 "
        f"`{plan.scored.digest()[:16]}`), calibration {len(plan.calibration.samples)} other files (sha256 "
        f"`{plan.calibration.digest()[:16]}`: the files whose path hashes into the first share)",
        f"- budget: {headline} within {budget} of eager's ({fmt(eager.metric if eager else None, '.4f')}): "
        f"floor {fmt(floor, '.4f')}",
        "- one TorchServe (the shipped config, the model API on); each variant registered alone with one worker, "
        "scored through REST, then loaded closed loop",
        "",
        *table(rows, headline, chosen, eager.req_s if eager else None),
        "",
        f"**Choice: {chosen.kind if chosen else 'none'}**"
        + (
            f" ({headline} {chosen.metric:.4f}, {chosen.req_s:.1f} req/s)"
            if chosen and chosen.metric is not None and chosen.req_s
            else ""
        ),
        "",
        "![pareto](pareto.png)",
    ]
    notes = [r for r in rows if r.note or r.float_layers]
    if notes:
        lines += ["", "## Notes", ""]
        for r in notes:
            floats = f" Layers kept in float: {', '.join(r.float_layers)}." if r.float_layers else ""
            lines.append(f"- {r.kind}: {r.note}.{floats}")
    return lines


# ---------------------------------------------------------------------------------------------- entry point


def evidence(plan: Plan, chosen: Row, eager: Row, headline: str, report: Path) -> dict[str, Any]:
    return {
        "metric": headline,
        "value": round(float(chosen.metric or 0.0), 6),
        "baseline": round(float(eager.metric or 0.0), 6),
        "budget": f"{plan.budget:g} {'relative' if plan.relative else 'absolute'}",
        "req_s": round(float(chosen.req_s or 0.0), 2),
        "speedup": round(float(chosen.req_s or 0.0) / float(eager.req_s or 1.0), 3),
        "float_layers": list(chosen.float_layers),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "data": f"{plan.scored.root} (scored split sha256 {plan.scored.digest()})",
        "report": str(report),
    }


def run(plan: Plan, kinds: Sequence[str], *, seconds: float, concurrency: int, record: bool = True) -> dict[str, Any]:
    """Build, serve and measure every kind; choose; write the report (and the choice into the folder)."""
    document = read_model_document(plan.folder)
    headline = {"classification": "top1", "detection": "AP", "segmentation": "mIoU"}[plan.scored.task]
    logger.info("machine: %s", machine())
    logger.info(
        "%s: %d scored files, %d calibration files; kinds: %s",
        plan.name,
        len(plan.scored.samples),
        len(plan.calibration.samples),
        ", ".join(kinds),
    )
    import shutil

    for stale in ("onnx-export", "aoti-build", "stage", "store"):  # every variant is built from the folder as it is now
        shutil.rmtree(plan.work / stale, ignore_errors=True)
    # one eager pass over the calibration split, made when the first int8 kind needs it, shared by the others
    calibration = functools.cache(lambda: calibrate(plan.folder, document, plan.calibration, plan.blank_calibration))
    built = []
    for kind in kinds:
        result = build(plan, KINDS[kind], document, calibration)
        logger.info("built %s: %s", kind, result.reason or f"{result.archive} ({result.seconds:.0f} s) {result.note}")
        built.append(result)
    rows: list[Row] = []
    with management_server(plan.store, plan.work / "torchserve") as server:
        for item in built:
            if item.archive is None:
                rows.append(Row(item.kind.name, item.reason, note=item.note))
                continue
            row = measure(server, item, plan, seconds=seconds, concurrency=concurrency)
            logger.info(
                "%s: %s %s, %s req/s, p99 %s ms%s",
                row.kind,
                headline,
                fmt(row.metric, ".4f"),
                fmt(row.req_s, ".1f"),
                fmt(row.p99_ms, ".0f"),
                "" if row.status == "measured" else f" ({row.status})",
            )
            rows.append(row)
    chosen, floor = choose(rows, plan)
    plan.work.mkdir(parents=True, exist_ok=True)
    report = plan.work / "report.md"
    draw_pareto(rows, headline, floor, chosen, plan.work / "pareto.png")
    lines = report_lines(plan, rows, headline, chosen, floor)
    document_out = {
        "model": plan.name,
        "machine": machine(),
        "headline": headline,
        "budget": plan.budget,
        "relative": plan.relative,
        "floor": floor,
        "chosen": chosen.kind if chosen else None,
        "rows": [dataclasses.asdict(r) for r in rows],
        "data": {
            "root": str(plan.scored.root),
            "scored": plan.scored.digest(),
            "calibration": plan.calibration.digest(),
        },
    }
    (plan.work / "variants.json").write_text(json.dumps(document_out, indent=2) + "\n", encoding="utf-8")
    eager = next((r for r in rows if r.kind == "eager"), None)
    if chosen is not None and eager is not None and record:
        item = next(b for b in built if b.kind.name == chosen.kind)
        path = write_choice(plan.folder, item.kind, item.file, evidence(plan, chosen, eager, headline, report))
        lines += ["", f"The choice is recorded in `{path}`; `make archive MODEL={plan.name}` builds it."]
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return document_out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="the model folder models/<name>")
    parser.add_argument("data", type=Path, help="labeled data, as make eval reads it")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("build/variants"))
    parser.add_argument("--budget", type=float, default=0.01, help="absolute, in the metric's units")
    parser.add_argument("--budget-rel", type=float, default=None, help="relative instead (0.01: 1 %% of eager's)")
    parser.add_argument("--kinds", nargs="*", default=list(DEFAULT_KINDS), choices=list(KINDS))
    parser.add_argument("--seconds", type=float, default=10.0, help="closed-loop load per variant")
    parser.add_argument("--concurrency", type=int, default=16, help="the load's concurrency (the bench's)")
    parser.add_argument("--calibration-share", type=float, default=0.2)
    parser.add_argument("--blank-calibration", action="store_true", help="calibrate int8 on blank images (broken)")
    parser.add_argument("--no-accuracy-control", action="store_true", help="plain int8 only")
    parser.add_argument("--no-record", action="store_true", help="report only; leave the folder's choice as it is")
    parser.add_argument("--label-map", type=Path, default=None)
    parser.add_argument("--images", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    for ours in ("variants", "tsctl", "evaluate"):  # the libraries' own INFO lines (ONNX passes, NNCF) stay out
        logging.getLogger(ours).setLevel(logging.INFO)
    logging.getLogger("nncf").setLevel(logging.ERROR)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on a CPU
    try:
        folder = args.models / args.name
        if not (folder / "model-config.yaml").is_file():
            raise ConfigError(f"{folder} is not a model folder (no model-config.yaml); `make scaffold` makes one")
        handler = read_model_document(folder)["handler"]
        from archive_args import needed_files

        needed_files(folder, parse_handler_config(handler))  # a folder without its weights: one line, no sweep
        labels = yaml.safe_load((folder / handler.get("labels", "labels.json")).read_text(encoding="utf-8"))
        dataset = load_dataset(
            args.data, str(handler.get("task")), labels, label_map=args.label_map, images=args.images
        )
        calibration, scored = split(dataset, args.calibration_share)
        if not scored.samples:
            raise DataError(f"DATA {args.data} has too few files to split into calibration and scored parts")
        plan = Plan(
            args.name,
            args.models,
            calibration,
            scored,
            args.out / args.name,
            args.budget_rel if args.budget_rel is not None else args.budget,
            relative=args.budget_rel is not None,
            blank_calibration=args.blank_calibration,
            accuracy_control=not args.no_accuracy_control,
        )
        doc = run(plan, args.kinds, seconds=args.seconds, concurrency=args.concurrency, record=not args.no_record)
    except (DataError, ConfigError) as exc:
        sys.stderr.write(error_line(exc, f"measure the variants of {args.name}") + "\n")
        return 2
    report = args.out / args.name / "report.md"
    sys.stdout.write(report.read_text(encoding="utf-8"))
    sys.stdout.write(f"\n{args.name}: chose {doc['chosen']} -> {report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
