"""``make qat MODEL=<name> DATA=<images> [EPOCHS=3] [NAME=<name>_qat]``: quantization-aware training.

For when post-training int8 (the ``torch_int8`` variant of ``make variants``) costs more accuracy than the
budget allows. The folder's classifier is exported strictly, fake-quantized with torchao's X86 quantizer
(``prepare_qat_pt2e``: int8 weights per channel, int8 activations, batch norm folded as the int8 graph will
have it), fine-tuned on DATA by the distillation loss from the fp32 model itself (KL on soft logits at a
temperature, plus the labels' loss when DATA has labels: ``distill.distil``), then converted.

Beside it, the same network quantized after training (calibrated on the same training images) is scored, so
the report shows fp32, post-training int8 and QAT int8 side by side on the held-out split. It writes a new
model folder ``models/<name>_qat`` serving the int8 program (``model.int8.pt2``, format ``exported``,
compiled at load as the ``torch_int8`` variant is) that archives and goes through ``make variants`` like any
other, and ``build/compress/<name>_qat/report.md``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path

from distill import (
    CompressError,
    Settings,
    data_facts,
    distil,
    normalized,
    predictions,
    quality,
    read_data,
    read_teacher,
    settings_from,
    stamp,
    training_arguments,
    training_fact,
    write_folder,
    write_report,
    written_document,
)
from servekit.program_backend import torch_module
from torch_int8 import (
    INT8_COMPILE,
    Program,
    Saved,
    batch_bound,
    calibrated,
    pt2e,
    save_program,
    traced,
    x86_quantizer,
)

logger = logging.getLogger("qat")
QAT_LR = 1e-4  # fine-tuning a trained network: a tenth of a step of make distill's


def qat_folder(
    name: str,
    data_path: Path,
    *,
    models: Path,
    settings: Settings,
    out_name: str = "",
    label_map: Path | None = None,
    out: Path = Path("build/compress"),
) -> str:
    """``make qat``: PTQ and QAT of the folder's classifier, ``models/<name>_qat`` written; the summary line."""
    teacher = read_teacher(name, models, "qat")
    network = torch_module(teacher.network)
    if network is None:
        raise CompressError(
            f"make qat needs a torch network (state_dict, safetensors or exported); {name} is "
            f"format {teacher.config.model.format}"
        )
    out_name = out_name or f"{name}_qat"
    data = read_data(data_path, teacher.config, teacher.labels, label_map)
    size, config = teacher.config.input_size, teacher.config
    bound = batch_bound(teacher.network, int(teacher.document.get("batchSize", 1)))
    reference = predictions(network, data.held_out, config)
    fp32 = quality(reference, reference, data.held_out)

    started = time.perf_counter()
    calibration = [normalized(chunk, config) for chunk in data.train.crops.split(32)]
    ptq = Program(calibrated(copy.deepcopy(network), size, bound, calibration), bound).eval()
    ptq_quality = quality(predictions(ptq, data.held_out, config), reference, data.held_out)
    ptq_seconds = time.perf_counter() - started
    logger.info("%s: post-training int8 in %.0f s: held out %s", name, ptq_seconds, ptq_quality.describe())

    started = time.perf_counter()
    # traced for the training batch, so that batch norm sees whole batches; the saved program keeps ``bound``
    steps = max(bound, settings.batch)
    fake = pt2e().prepare_qat_pt2e(traced(copy.deepcopy(network), size, steps, training=True), x86_quantizer(qat=True))
    student = Program(fake, steps)
    losses = distil(student, network, data.train, config, settings)
    student.eval()
    converted = pt2e().convert_pt2e(student.graph)
    seconds = time.perf_counter() - started
    qat_quality = quality(predictions(Program(converted, steps), data.held_out, config), reference, data.held_out)

    saved: list[Saved] = []
    check = normalized(data.held_out.crops[:4], config) if len(data.held_out) else calibration[0]

    def write_program(path: Path) -> None:
        saved.append(save_program(converted, size, bound, path, check))

    model = {"file": "model.int8.pt2", "format": "exported"}
    document = written_document(teacher.document, model)
    document["handler"]["compile"] = dict(INT8_COMPILE)
    document["startupTimeout"] = max(600, int(teacher.document.get("startupTimeout", 0)))
    header = (
        f"{out_name}: {name} fine-tuned with fake int8 quantization and converted by `make qat` ({stamp()}) on "
        f"{data.root}; compiled at load (a minute or two); report build/compress/{out_name}/report.md"
    )
    write_folder(teacher.folder, models / out_name, document, {"model.int8.pt2": write_program}, header)
    facts = {
        "model": f"{name} ({teacher.config.model.architecture or teacher.config.model.format})",
        "quantizer": "torchao X86InductorQuantizer: int8 weights per channel, int8 activations per tensor (pt2e)",
        **data_facts(data),
        "post-training int8": f"calibrated on the {len(data.train)} training images in {ptq_seconds:.0f} s",
        "quantization-aware training": training_fact(settings, seconds, losses) + " (distilled from the fp32 model)",
        "folder": f"{models / out_name} (model.int8.pt2: {saved[0].megabytes:.1f} MB, max |logit diff| from the "
        f"converted graph {saved[0].max_abs_diff:.1e}; served as format exported, compiled at load)",
        "date": stamp(),
    }
    rows = [
        (f"{name} fp32", fp32, "the teacher"),
        ("post-training int8 (PTQ)", ptq_quality, "what make variants' torch_int8 builds"),
        ("quantization-aware int8 (QAT)", qat_quality, out_name),
    ]
    report = write_report(out / out_name, f"make qat: {out_name}", facts, rows)
    return (
        f"wrote {models / out_name}: held out: fp32 {fp32.describe()}; PTQ int8 {ptq_quality.describe()}; "
        f"QAT int8 {qat_quality.describe()}; {report}"
    )


def main(argv: list[str] | None = None) -> int:
    from cli import report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--out-name", default="", help="the new folder (default <name>_qat)")
    training_arguments(parser, epochs=3, lr=QAT_LR)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    return report(
        lambda: qat_folder(
            args.name,
            args.data,
            models=args.models,
            settings=settings_from(args),
            out_name=args.out_name,
            label_map=args.label_map,
            out=args.out,
        ),
        f"qat {args.name}",
    )


if __name__ == "__main__":
    sys.exit(main())
