"""Knowledge distillation on the user's images, and the model folders it writes (``make distill``, ``make prune``).

``make distill TEACHER=<name> ARCH=<student> DATA=<images> [EPOCHS=..] [NAME=..]``: a smaller architecture
(a torchvision name, or ``timm:<name>``) trained from the teacher's soft labels on the user's images, as
the served model sees them (the teacher folder's own decode, resize, crop and normalization). The loss is
KL divergence between the student's and the teacher's logits softened at a temperature (times T squared,
Hinton et al.), plus the labels' cross-entropy when DATA has labels (an ImageFolder tree or a ``path,label``
CSV whose classes are the teacher's); a folder of unlabeled images is what most users have, and is enough.

A split of DATA (the files whose path hashes into the first 20 %, at most 300) is held out and never trained
on: it reports top-1 (with labels) and the agreement with the teacher's top-1 (always), before and after.
Files that do not decode are counted and named in the report, never silently dropped.

The student is written as a model folder (``models/<NAME>``: state_dict, the teacher's recipe and labels)
that scaffolds, archives, serves and goes through ``make variants`` like any other; the report is
``build/compress/<NAME>/report.md`` and ``report.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from servekit.config import ClassifierConfig, read_model_config, read_model_document
from servekit.errors import ConfigError, KitError, plain_line
from servekit.loading import load_labels, load_model

logger = logging.getLogger("distill")
HELD_OUT_SHARE = 0.2
HELD_OUT_MOST = 300
UNLABELED = "images"  # the layout of a folder read without labels


class CompressError(ConfigError):
    """A model or data that ``make prune`` / ``make distill`` cannot work with: one line saying why."""


# ---------------------------------------------------------------------------------------------- the images


@dataclass(frozen=True)
class Images:
    """The user's images as the served model receives them: uint8 crops, labels when DATA has them."""

    crops: torch.Tensor  # N x 3 x H x W uint8, the folder's recipe applied
    labels: torch.Tensor | None  # N class indices of the model's labels, or None (unlabeled images)
    paths: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class Data:
    """DATA read for training: the training part, the held-out part, how it was read, the files left out."""

    train: Images
    held_out: Images
    layout: str
    root: Path
    skipped: tuple[tuple[str, str], ...]  # (file, why it was left out)


def listed(data: Path, labels: Sequence[str], label_map: Path | None) -> tuple[Any, str]:
    """DATA as an eval_data Dataset: labeled when it is an ImageFolder tree or a CSV of the model's classes,
    otherwise every image under it, unlabeled (truth -1)."""
    from eval_data import IMAGE_SUFFIXES, DataError, Dataset, Sample, is_image, load_dataset

    if not data.exists():
        raise CompressError(f"DATA {data} does not exist; give a folder of images (class folders optional) or a CSV")
    try:
        dataset = load_dataset(data, "classification", labels, label_map=label_map)
        return dataset, f"{dataset.layout} with labels"
    except DataError as error:
        if data.is_file() or label_map is not None:
            raise
        why = str(error)
    files = tuple(sorted(p for p in data.rglob("*") if is_image(p)))
    if not files:
        raise CompressError(f"DATA {data} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    logger.info("%s: no labels read (%s); training on the teacher's answers alone", data, why.split(";", maxsplit=1)[0])
    samples = tuple(Sample(p, -1) for p in files)
    return Dataset("classification", UNLABELED, data, samples, tuple(labels)), "images without labels"


def crops_of(paths: Sequence[Path], config: ClassifierConfig) -> list[Any]:
    """Each file's uint8 crop by the folder's recipe, or the error that file gave (named in the report)."""
    from tqdm import tqdm

    from servekit.service import classifier_item

    crops: list[Any] = []
    for path in tqdm(paths, desc="decoding", unit="img", disable=None, leave=False):
        try:
            crops.append(classifier_item({"body": path.read_bytes()}, config))
        except (KitError, ConfigError, OSError, ValueError) as exc:
            crops.append(exc)
    return crops


def read_data(data: Path, config: ClassifierConfig, labels: Sequence[str], label_map: Path | None = None) -> Data:
    """DATA decoded once by the folder's recipe, split into training and held-out parts (stable by path)."""
    from eval_data import split

    dataset, layout = listed(data, labels, label_map)
    held, train = split(dataset, HELD_OUT_SHARE, HELD_OUT_MOST)
    parts = []
    skipped: list[tuple[str, str]] = list(dataset.excluded)
    for part in (train, held):
        paths = [s.path for s in part.samples]
        crops = crops_of(paths, config)
        skipped += [(str(p), plain_line(str(c))) for p, c in zip(paths, crops) if isinstance(c, BaseException)]
        good = [i for i, crop in enumerate(crops) if not isinstance(crop, BaseException)]
        truth = [int(part.samples[i].truth) for i in good]  # type: ignore[arg-type]
        stacked = torch.stack([crops[i] for i in good]) if good else torch.zeros(0, 3, *config.input_size)
        tensor = torch.tensor(truth, dtype=torch.long) if dataset.layout != UNLABELED else None
        parts.append(Images(stacked.to(torch.uint8), tensor, tuple(paths[i] for i in good)))
    if len(parts[0]) == 0:
        raise CompressError(f"DATA {data}: none of its {len(dataset.samples)} images decoded; {skipped[0][1]}")
    return Data(parts[0], parts[1], layout, data, tuple(skipped))


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Settings:
    """How the student is trained on the teacher's answers."""

    epochs: int = 8
    batch: int = 64
    lr: float = 5e-3
    weight_decay: float = 1e-4
    temperature: float = 4.0
    label_weight: float = 0.5  # the labels' cross-entropy share of the loss, when DATA has labels
    shift: float = 1 / 16  # random translation of up to this share of the side (no flips: text, digits)
    seed: int = 0


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on logits softened at ``temperature``, scaled by T^2 (gradients of the soft
    part keep their size whatever T is)."""
    soft_student = F.log_softmax(student / temperature, dim=-1)
    soft_teacher = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(soft_student, soft_teacher, log_target=True, reduction="batchmean") * temperature**2


def shifted(batch: torch.Tensor, most: int, generator: torch.Generator) -> torch.Tensor:
    """The batch translated by one random offset of up to ``most`` pixels each way (edge pixels repeated)."""
    if most <= 0:
        return batch
    dy, dx = (int(v) for v in torch.randint(-most, most + 1, (2,), generator=generator))
    padded = F.pad(batch, (most, most, most, most), mode="replicate")
    height, width = batch.shape[-2:]
    return padded[..., most + dy : most + dy + height, most + dx : most + dx + width]


def normalized(crops: torch.Tensor, config: ClassifierConfig) -> torch.Tensor:
    from servekit.transforms import classifier_batch

    return classifier_batch(list(crops), config)


def distil(
    student: torch.nn.Module,
    teacher: Callable[[torch.Tensor], torch.Tensor],
    data: Images,
    config: ClassifierConfig,
    settings: Settings,
) -> list[float]:
    """Train ``student`` in place from ``teacher``'s logits (and the labels, if any) on ``data``; returns each
    epoch's mean loss. ``student`` may also be a fake-quantized (QAT) program: it is only called and stepped."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    per_epoch = (len(data) + settings.batch - 1) // settings.batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=max(1, settings.epochs * per_epoch), pct_start=0.15
    )
    most = round(settings.shift * min(config.input_size))
    losses: list[float] = []
    bar = tqdm(total=settings.epochs * per_epoch, desc="distilling", unit="step", leave=False, disable=None)
    for _ in range(settings.epochs):
        student.train()
        total = 0.0
        for idx in torch.randperm(len(data), generator=generator).split(settings.batch):
            x = normalized(shifted(data.crops[idx], most, generator), config)
            with torch.no_grad():
                target = teacher(x).float()
            logits = student(x)
            loss = kd_loss(logits, target, settings.temperature)
            if data.labels is not None:
                hard = F.cross_entropy(logits, data.labels[idx])
                loss = (1 - settings.label_weight) * loss + settings.label_weight * hard
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
            bar.update(1)
        losses.append(total / max(1, len(data)))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    student.eval()
    return losses


@dataclass(frozen=True)
class Quality:
    """A network on the held-out images: top-1 (None without labels) and agreement with the teacher's top-1."""

    top1: float | None
    agreement: float

    def describe(self) -> str:
        top1 = "-" if self.top1 is None else f"{self.top1:.4f}"
        return f"top-1 {top1}, agreement with the teacher {self.agreement:.4f}"


def predictions(
    network: Callable[[torch.Tensor], torch.Tensor], data: Images, config: ClassifierConfig
) -> torch.Tensor:
    """Top-1 class index of every image, in batches of 32."""
    if len(data) == 0:
        return torch.zeros(0, dtype=torch.long)
    with torch.inference_mode():
        return torch.cat([network(normalized(chunk, config)).argmax(-1) for chunk in data.crops.split(32)])


def quality(predicted: torch.Tensor, teacher: torch.Tensor, data: Images) -> Quality:
    if len(data) == 0:
        return Quality(None, float("nan"))
    top1 = None if data.labels is None else float((predicted == data.labels).float().mean())
    return Quality(top1, float((predicted == teacher).float().mean()))


# ---------------------------------------------------------------------------------------------- the folder


def macs_and_params(network: torch.nn.Module, size: tuple[int, int]) -> tuple[float, int]:
    """Multiply-accumulates of one image at ``size`` and the parameter count (torch-pruning's counter)."""
    import torch_pruning as tp

    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(network, torch.zeros(1, 3, *size))
    return float(macs), int(params)


def written_document(document: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any]:
    """The source folder's model-config with its handler serving ``model`` instead; the recipe, labels, batch
    and worker settings unchanged (a chosen variant or compile setting of the source is not carried over)."""
    out = dict(document)
    handler = {key: value for key, value in document["handler"].items() if key != "compile"}
    handler["model"] = dict(model)
    out["handler"] = handler
    return out


def write_folder(
    source: Path, target: Path, document: Mapping[str, Any], files: Mapping[str, Any], header: str
) -> Path:
    """A new model folder ``target``: ``files`` (name -> bytes writer), the source's labels file, and
    ``document`` as its model-config.yaml under ``header`` (comment lines saying how it was made)."""
    if target.resolve() == source.resolve():
        raise CompressError(f"NAME must differ from the source folder {source.name}")
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name, write in files.items():
        write(target / name)
    labels = str(document["handler"].get("labels", "labels.json"))
    shutil.copy2(source / labels, target / Path(labels).name)
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(dict(document), sort_keys=False)
    (target / "model-config.yaml").write_text(text, encoding="utf-8")
    return target


@dataclass(frozen=True)
class Teacher:
    """The source folder: its config, document, network and labels."""

    name: str
    folder: Path
    config: ClassifierConfig
    document: Mapping[str, Any]
    network: Any
    labels: list[str]


def read_teacher(name: str, models: Path, what: str) -> Teacher:
    folder = models / name
    if not (folder / "model-config.yaml").is_file():
        raise CompressError(f"{folder} is not a model folder (no model-config.yaml); `make scaffold` makes one")
    config = read_model_config(folder)
    if not isinstance(config, ClassifierConfig):
        raise CompressError(f"make {what} works on classifiers; {name} is a {config.task} model")
    document = read_model_document(folder)
    network = load_model(folder, config.model, torch.device("cpu"))
    return Teacher(name, folder, config, document, network, load_labels(folder / config.labels))


def student_network(arch: str, classes: int) -> torch.nn.Module:
    """An untrained ``arch`` (torchvision name or ``timm:<name>``) with ``classes`` outputs."""
    from servekit.timm_source import build_timm, is_timm

    if is_timm(arch):
        return build_timm(arch, {"num_classes": classes})
    import torchvision

    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=classes)
    except ValueError:
        known = ", ".join(n for n in torchvision.models.list_models(torchvision.models) if "mobilenet" in n)
        raise CompressError(f"ARCH {arch!r} is not a torchvision classifier (e.g. {known}) nor timm:<name>") from None


def report_lines(title: str, facts: Mapping[str, Any], rows: Sequence[tuple[str, Quality, str]]) -> list[str]:
    """The markdown report: what was done, and each network's held-out quality."""
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in facts.items()]
    lines += ["", "| network | held-out top-1 | agreement with the teacher | |", "|---|---|---|---|"]
    for label, q, note in rows:
        top1 = "-" if q.top1 is None else f"{q.top1:.4f}"
        lines.append(f"| {label} | {top1} | {q.agreement:.4f} | {note} |")
    return lines


def write_report(out: Path, title: str, facts: Mapping[str, Any], rows: Sequence[tuple[str, Quality, str]]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(report_lines(title, facts, rows)) + "\n", encoding="utf-8")
    document = {
        "facts": dict(facts),
        "networks": {label: {**dataclasses.asdict(q), "note": note} for label, q, note in rows},
    }
    (out / "report.json").write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    return out / "report.md"


def data_facts(data: Data) -> dict[str, Any]:
    shown = "; ".join(f"{f}: {why}" for f, why in data.skipped[:5]) + (", ..." if len(data.skipped) > 5 else "")
    skipped = f"{len(data.skipped)}" + (f" ({shown})" if data.skipped else "")
    return {
        "data": f"{data.root} ({data.layout})",
        "trained on": f"{len(data.train)} images",
        "held out": f"{len(data.held_out)} images (never trained on)",
        "files left out": skipped,
    }


def training_fact(settings: Settings, seconds: float, losses: Sequence[float]) -> str:
    return (
        f"{settings.epochs} epochs, batch {settings.batch}, lr {settings.lr}, T {settings.temperature}, "
        f"{seconds:.0f} s; losses {', '.join(f'{v:.3f}' for v in losses)}"
    )


def stamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


# ---------------------------------------------------------------------------------------------- make distill


def distill_folder(
    teacher_name: str,
    arch: str,
    data_path: Path,
    *,
    models: Path,
    name: str,
    settings: Settings,
    label_map: Path | None = None,
    out: Path = Path("build/compress"),
) -> str:
    """``make distill``: train ``arch`` from the teacher on DATA, write ``models/<name>``; the summary line."""
    teacher = read_teacher(teacher_name, models, "distill")
    data = read_data(data_path, teacher.config, teacher.labels, label_map)
    student = student_network(arch, len(teacher.labels))
    size = teacher.config.input_size
    reference = predictions(teacher.network, data.held_out, teacher.config)
    before = quality(reference, reference, data.held_out)
    started = time.perf_counter()
    losses = distil(student, teacher.network, data.train, teacher.config, settings)
    seconds = time.perf_counter() - started
    after = quality(predictions(student, data.held_out, teacher.config), reference, data.held_out)
    model = {"file": "model.safetensors", "format": "safetensors", "architecture": arch}
    model["kwargs"] = {"num_classes": len(teacher.labels)}
    document = written_document(teacher.document, model)
    header = (
        f"{name}: {arch} distilled from {teacher.name} by `make distill` ({stamp()}) on {data.root} "
        f"({len(data.train)} images, {settings.epochs} epochs); report build/compress/{name}/report.md"
    )
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in student.state_dict().items()}
    write_folder(teacher.folder, models / name, document, {"model.safetensors": lambda p: save_file(state, p)}, header)
    teacher_macs, teacher_params = macs_and_params(teacher.network, size)
    macs, params = macs_and_params(student, size)
    facts = {
        "teacher": f"{teacher.name} ({teacher_macs / 1e6:.1f} M MACs, {teacher_params / 1e6:.2f} M parameters)",
        "student": f"{arch} ({macs / 1e6:.1f} M MACs, {params / 1e6:.2f} M parameters)",
        **data_facts(data),
        "training": training_fact(settings, seconds, losses),
        "folder": str(models / name),
        "date": stamp(),
    }
    rows = [(f"teacher {teacher.name}", before, ""), (f"student {arch}", after, "distilled")]
    report = write_report(out / name, f"make distill: {name}", facts, rows)
    return (
        f"wrote {models / name} ({arch}, {macs / 1e6:.1f} M MACs against the teacher's {teacher_macs / 1e6:.1f} M) "
        f"in {seconds:.0f} s; held out: teacher {before.describe()}; student {after.describe()}; {report}"
    )


def settings_from(args: argparse.Namespace) -> Settings:
    return Settings(epochs=args.epochs, batch=args.batch, lr=args.lr, temperature=args.temperature)


def training_arguments(parser: argparse.ArgumentParser, epochs: int, lr: float = Settings.lr) -> None:
    """The options ``make distill``, ``make prune`` and ``make qat`` share."""
    parser.add_argument("--data", type=Path, required=True, help="images: class folders or a CSV add labels")
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=Path("build/compress"))
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch", type=int, default=Settings.batch)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--temperature", type=float, default=Settings.temperature)
    parser.add_argument("--label-map", type=Path, default=None)


def main(argv: list[str] | None = None) -> int:
    from cli import report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("teacher")
    parser.add_argument("--arch", required=True, help="the student: a torchvision name or timm:<name>")
    parser.add_argument("--name", default="", help="the new folder (default <teacher>_<arch>)")
    training_arguments(parser, epochs=20)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    name = args.name or f"{args.teacher}_{args.arch.replace('timm:', '').replace('/', '_')}"
    return report(
        lambda: distill_folder(
            args.teacher,
            args.arch,
            args.data,
            models=args.models,
            name=name,
            settings=settings_from(args),
            label_map=args.label_map,
            out=args.out,
        ),
        f"distill {args.teacher}",
    )


if __name__ == "__main__":
    sys.exit(main())
