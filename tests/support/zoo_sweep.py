"""The zoo sweep: a broad set of architectures from torchvision, timm and Hugging Face, each saved the way its
zoo saves it, with the owner's own pipeline beside it, for ``tests/zoo/test_zoo_sweep.py`` (``make test-zoo``).

Each case builds a tiny (or the smallest) network of one architecture, makes it sensitive to preprocessing
(``zoo_models.sensitize``: BatchNorm statistics from the photos, a head whose logits spread), saves it as its
zoo does (a torchvision state_dict, a timm state_dict or hub folder, a Hugging Face ``save_pretrained`` folder)
and returns the owner's pipeline: a function from a PIL image to what the owner computes (a classifier's
probabilities through ``weights.transforms()``, timm's ``create_transform`` or the image processor; a
segmenter's label map through the processor and ``post_process_semantic_segmentation``; a detector's
detections through the torchvision module or ``post_process_object_detection``). :func:`verdict` compares a
served answer with it.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

from zoo_models import seeded_detector, sensitize, torch_pipeline

CLASSES = 6
LABELS = [f"kind_{i}" for i in range(CLASSES)]
BOUND = 0.01  # a classifier's largest probability difference from the owner's pipeline
PIXELS = 0.99  # a segmenter's share of pixels whose class equals the owner's
BOX_PX = 0.5  # a detector's largest box difference, in pixels
SCORE = 1e-3  # a detector's largest score difference
LEVELS = 2.0  # a classifier's largest input difference from the owner's, in 0-255 levels (resize kernels' rounding)


@dataclass
class Built:
    """One saved model: ``make scaffold`` variables, the owner's pipeline, the keys a user would set."""

    make_vars: dict[str, str]
    reference: Callable[[Image.Image], Any]
    edits: dict[str, Any] = field(default_factory=dict)
    transform: Callable[[Image.Image], torch.Tensor] | None = None  # a classifier's: the owner's input tensor


@dataclass(frozen=True)
class Case:
    """One architecture of one zoo, for one task."""

    name: str
    zoo: str
    task: str
    build: Callable[[Path, Sequence[Image.Image]], Built]


@dataclass
class Row:
    """What one case did: holds, differs (worst difference) or refused (scaffold's line)."""

    name: str
    zoo: str
    task: str
    verdict: str
    worst: float | None = None
    line: str = ""


# ------------------------------------------------------------------ torchvision


def tv_classifier(architecture: str, **kwargs: Any) -> Callable[[Path, Sequence[Image.Image]], Built]:
    def build(folder: Path, photos: Sequence[Image.Image]) -> Built:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torchvision.models.get_model(architecture, weights=None, num_classes=CLASSES, **kwargs).eval()
        transform = torchvision.models.get_model_weights(architecture).DEFAULT.transforms()
        sensitize(model, torch.stack([transform(p) for p in photos]))
        path = folder / f"{architecture}.pth"
        torch.save(model.state_dict(), path)
        return Built({"PT": str(path), "ARCH": architecture}, torch_pipeline(model, transform), transform=transform)

    return build


def tv_segmenter(architecture: str) -> Callable[[Path, Sequence[Image.Image]], Built]:
    def build(folder: Path, photos: Sequence[Image.Image]) -> Built:
        torch.manual_seed(0)
        network = torchvision.models.get_model(architecture, weights=None, weights_backbone=None, num_classes=CLASSES)
        with torch.no_grad():  # a seeded head answers one class everywhere: let the features decide
            for layer in network.modules():
                if isinstance(layer, torch.nn.Conv2d) and layer.out_channels == CLASSES:
                    layer.weight.mul_(50.0)
                    if layer.bias is not None:
                        layer.bias.zero_()
        network.eval()
        path = folder / f"{architecture}.pth"
        torch.save(network.state_dict(), path)
        transform = torchvision.models.get_model_weights(architecture).DEFAULT.transforms()

        def reference(image: Image.Image) -> np.ndarray:
            with torch.inference_mode():
                logits = network(transform(image)[None])["out"]
            up = torch.nn.functional.interpolate(logits, (image.height, image.width), mode="bilinear")
            return up[0].argmax(0).numpy()

        return Built({"PT": str(path), "ARCH": architecture}, reference)

    return build


def tv_detector(architecture: str, **kwargs: Any) -> Callable[[Path, Sequence[Image.Image]], Built]:
    def build(folder: Path, photos: Sequence[Image.Image]) -> Built:
        model = seeded_detector(architecture, CLASSES, 0, **kwargs)
        path = folder / f"{architecture}.pth"
        torch.save(model.state_dict(), path)
        edits: dict[str, Any] = {"score_threshold": 0.0, "max_detections": 10}
        if kwargs:
            edits["model"] = {"kwargs": kwargs}

        def reference(image: Image.Image) -> list[dict[str, Any]]:
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
            with torch.inference_mode():
                out = model([x])[0]
            order = torch.argsort(out["scores"], descending=True, stable=True)[:10]
            return [
                {"index": int(out["labels"][i]), "score": float(out["scores"][i]), "box": out["boxes"][i].tolist()}
                for i in order
            ]

        labels = folder / f"{architecture}.txt"
        labels.write_text("".join(f"{n}\n" for n in LABELS[1:]))
        return Built({"PT": str(path), "ARCH": architecture, "LABELS": str(labels)}, reference, edits)

    return build


TORCHVISION = [
    *(
        Case(f"tv_{arch}", "torchvision", "classification", tv_classifier(arch, **kw))
        for arch, kw in [
            ("resnet18", {}), ("squeezenet1_1", {}), ("mobilenet_v2", {}), ("mobilenet_v3_small", {}),
            ("mnasnet0_5", {}), ("shufflenet_v2_x0_5", {}), ("googlenet", {"aux_logits": False, "init_weights": True}),
            ("inception_v3", {"aux_logits": False, "init_weights": True}), ("densenet121", {}),
            ("regnet_y_400mf", {}), ("efficientnet_b0", {}), ("efficientnet_v2_s", {}), ("convnext_tiny", {}),
            ("maxvit_t", {}), ("swin_t", {}), ("swin_v2_t", {}), ("resnext50_32x4d", {}), ("alexnet", {}),
            ("vit_b_16", {}), ("regnet_x_400mf", {}), ("wide_resnet50_2", {}),
        ]
    ),
    Case("tv_lraspp", "torchvision", "segmentation", tv_segmenter("lraspp_mobilenet_v3_large")),
    Case("tv_deeplabv3_mbv3", "torchvision", "segmentation", tv_segmenter("deeplabv3_mobilenet_v3_large")),
    Case("tv_fcn_resnet50", "torchvision", "segmentation", tv_segmenter("fcn_resnet50")),
    Case("tv_fasterrcnn_mbv3", "torchvision", "detection", tv_detector("fasterrcnn_mobilenet_v3_large_320_fpn")),
    Case("tv_ssdlite", "torchvision", "detection", tv_detector("ssdlite320_mobilenet_v3_large")),
]  # fmt: skip


# ------------------------------------------------------------------ timm


def timm_classifier(
    name: str, form: str = "state_dict", **kwargs: Any
) -> Callable[[Path, Sequence[Image.Image]], Built]:
    """A timm model saved as a state_dict (``ARCH=timm:<name>``), a hub folder (``save_for_hf``) or a
    ``train.py`` checkpoint trained at another input size (``kwargs['input_size']``)."""

    def build(folder: Path, photos: Sequence[Image.Image]) -> Built:
        import timm
        import timm.data

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=CLASSES).eval()
        args = dict(kwargs)
        transform = timm.data.create_transform(**timm.data.resolve_data_config(args, model=model))
        sensitize(model, torch.stack([transform(p) for p in photos]))
        if form == "hub":
            from timm.models._hub import save_for_hf

            target = folder / f"timm_{name}"
            save_for_hf(model, str(target), model_config={"label_names": LABELS}, safe_serialization=True)
            return Built({"PT": str(target)}, torch_pipeline(model, transform), transform=transform)
        if form == "train":
            import argparse

            namespace = argparse.Namespace(
                model=name, num_classes=CLASSES, img_size=None, crop_pct=None, mean=None, std=None, interpolation="",
                **{"input_size": None, **args},
            )  # fmt: skip
            path = folder / f"{name}_best.pth.tar"
            torch.save({"epoch": 1, "arch": name, "state_dict": model.state_dict(), "args": namespace}, path)
            return Built({"PT": str(path)}, torch_pipeline(model, transform), transform=transform)
        path = folder / f"{name}.pth"
        torch.save(model.state_dict(), path)
        return Built({"PT": str(path), "ARCH": f"timm:{name}"}, torch_pipeline(model, transform), transform=transform)

    return build


TIMM = [
    Case(f"timm_{name}", "timm", "classification", timm_classifier(name, form, **kw))
    for name, form, kw in [
        ("resnet18d", "train", {"input_size": (3, 160, 160)}), ("levit_128s", "state_dict", {}),
        ("mobilevitv2_050", "hub", {}), ("efficientnet_b0", "state_dict", {}), ("mobilenetv3_small_050", "hub", {}),
        ("regnetx_002", "state_dict", {}), ("convnext_atto", "state_dict", {}), ("ghostnet_100", "state_dict", {}),
        ("deit_tiny_patch16_224", "state_dict", {}), ("vit_tiny_patch16_224", "hub", {}),
        ("efficientformerv2_s0", "state_dict", {}), ("fastvit_t8", "state_dict", {}),
        ("edgenext_xx_small", "state_dict", {}), ("mobileone_s0", "state_dict", {}), ("repvgg_a0", "state_dict", {}),
        ("rexnet_100", "state_dict", {}), ("lcnet_050", "state_dict", {}), ("tinynet_e", "state_dict", {}),
        ("mixnet_s", "state_dict", {}), ("pit_ti_224", "state_dict", {}), ("xcit_nano_12_p16_224", "state_dict", {}),
        ("mobilenetv4_conv_small", "state_dict", {}), ("efficientvit_b0", "state_dict", {}),
        ("repvit_m0_9", "state_dict", {}), ("tiny_vit_5m_224", "state_dict", {}), ("hgnetv2_b0", "state_dict", {}),
        ("inception_v3", "state_dict", {}), ("crossvit_tiny_240", "state_dict", {}), ("dla34", "state_dict", {}),
        ("hrnet_w18_small", "state_dict", {}), ("cspresnet50", "state_dict", {}), ("densenet121", "state_dict", {}),
        ("eva02_tiny_patch14_224", "state_dict", {}), ("maxvit_nano_rw_256", "state_dict", {}),
        ("poolformerv2_s12", "state_dict", {}), ("convmixer_768_32", "state_dict", {}),
    ]
]  # fmt: skip


# ------------------------------------------------------------------ Hugging Face

ID2LABEL = dict(enumerate(LABELS))
SMALL_CNN = {"hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 1, 1]}
SMALL_VIT = {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 96}
# model_type -> the model class, its tiny config's keys (beside the labels), the processor's keys
HF_CLASSIFIERS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "vit": ("ViTForImageClassification", {**SMALL_VIT, "image_size": 224}, {}),
    "deit": ("DeiTForImageClassification", {**SMALL_VIT, "image_size": 224}, {}),
    "deit_teacher": ("DeiTForImageClassificationWithTeacher", {**SMALL_VIT, "image_size": 224}, {}),
    "levit": ("LevitForImageClassification", {"hidden_sizes": [32, 48, 64], "num_attention_heads": [1, 2, 2],
                                              "depths": [1, 1, 1], "key_dim": [8, 8, 8]}, {}),
    "levit_teacher": ("LevitForImageClassificationWithTeacher", {"hidden_sizes": [32, 48, 64],
                      "num_attention_heads": [1, 2, 2], "depths": [1, 1, 1], "key_dim": [8, 8, 8]}, {}),
    "beit": ("BeitForImageClassification", {**SMALL_VIT, "image_size": 224}, {}),
    "data2vec-vision": ("Data2VecVisionForImageClassification", {**SMALL_VIT, "image_size": 224}, {}),
    "bit": ("BitForImageClassification", {"hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 1, 1],
                                          "embedding_size": 16, "num_groups": 8}, {}),
    "convnext": ("ConvNextForImageClassification", SMALL_CNN, {"crop_pct": 0.875}),
    "convnextv2": ("ConvNextV2ForImageClassification", SMALL_CNN, {"crop_pct": 0.875}),
    "dinov2": ("Dinov2ForImageClassification", {**SMALL_VIT, "image_size": 224, "patch_size": 14}, {}),
    "efficientnet": ("EfficientNetForImageClassification", {"width_coefficient": 0.5, "depth_coefficient": 0.5,
                     "image_size": 224, "hidden_dim": 640}, {"size": {"height": 224, "width": 224}}),
    "focalnet": ("FocalNetForImageClassification", {"embed_dim": 16, "depths": [1, 1, 1, 1]}, {}),
    "mobilenet_v1": ("MobileNetV1ForImageClassification", {"depth_multiplier": 0.25}, {}),
    "mobilenet_v2": ("MobileNetV2ForImageClassification", {"depth_multiplier": 0.35},
                     {"crop_pct": 0.875, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}),
    "mobilevit": ("MobileViTForImageClassification", {"hidden_sizes": [32, 48, 64],
                  "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64], "image_size": 256},
                  {"size": {"shortest_edge": 288}, "crop_size": {"height": 256, "width": 256}}),
    "mobilevitv2": ("MobileViTV2ForImageClassification", {"width_multiplier": 0.5, "image_size": 256},
                    {"size": {"shortest_edge": 288}, "crop_size": {"height": 256, "width": 256}}),
    "poolformer": ("PoolFormerForImageClassification", {"hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 1, 1]},
                   {}),
    "pvt": ("PvtForImageClassification", {"hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 1, 1],
            "num_attention_heads": [1, 2, 2, 4]}, {}),
    "pvt_v2": ("PvtV2ForImageClassification", {"hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 1, 1],
               "num_attention_heads": [1, 2, 2, 4]}, {}),
    "regnet": ("RegNetForImageClassification", {"hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 1, 1],
                                                "embedding_size": 16, "groups_width": 8}, {"crop_pct": 0.875}),
    "resnet": ("ResNetForImageClassification", SMALL_CNN, {"crop_pct": 0.875}),
    "swin": ("SwinForImageClassification", {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]},
             {}),
    "swinv2": ("Swinv2ForImageClassification", {"embed_dim": 16, "depths": [1, 1, 1, 1],
                                                 "num_heads": [1, 1, 2, 2]}, {}),
    "swiftformer": ("SwiftFormerForImageClassification", {"embed_dims": [16, 32, 48, 64], "depths": [1, 1, 1, 1]},
                    {}),
    "segformer": ("SegformerForImageClassification", {"hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 1, 1],
                  "num_attention_heads": [1, 2, 2, 4]}, {}),
    "vit_msn": ("ViTMSNForImageClassification", {**SMALL_VIT, "image_size": 224}, {}),
}  # fmt: skip
HF_SEGMENTERS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "segformer": ("SegformerForSemanticSegmentation", {"hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 1, 1],
                  "num_attention_heads": [1, 2, 2, 4], "decoder_hidden_size": 32}, {}),
    "mobilevit": ("MobileViTForSemanticSegmentation", {"hidden_sizes": [32, 48, 64], "aspp_out_channels": 32,
                  "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64], "image_size": 512},
                  {"size": {"shortest_edge": 512}, "crop_size": {"height": 512, "width": 512}}),
    "mobilenet_v2": ("MobileNetV2ForSemanticSegmentation", {"depth_multiplier": 0.35},
                     {"size": {"shortest_edge": 513}, "crop_size": {"height": 513, "width": 513}}),
    "dpt": ("DPTForSemanticSegmentation", {**SMALL_VIT, "image_size": 384, "neck_hidden_sizes": [16, 32, 48, 64],
            "num_hidden_layers": 4, "fusion_hidden_size": 32, "backbone_out_indices": [0, 1, 2, 3],
            "neck_ignore_stages": [], "use_auxiliary_head": False},
            {"ensure_multiple_of": 32, "size": {"height": 384, "width": 384}}),
    "data2vec-vision": ("Data2VecVisionForSemanticSegmentation", {**SMALL_VIT, "num_hidden_layers": 4,
                        "image_size": 224, "out_indices": [0, 1, 2, 3], "pool_scales": [1, 2], "auxiliary_channels": 16,
                        "use_auxiliary_head": False}, {}),
    "beit": ("BeitForSemanticSegmentation", {**SMALL_VIT, "num_hidden_layers": 4, "image_size": 224,
             "out_indices": [0, 1, 2, 3],
             "pool_scales": [1, 2], "auxiliary_channels": 16, "use_auxiliary_head": False}, {}),
}  # fmt: skip


SMALL_RESNET = {"model_type": "resnet", "embedding_size": 16, "hidden_sizes": [16, 32, 48, 64], "depths": [1, 1, 1, 1]}
DETR_HEADS = {
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64,
    "num_queries": 20,
}
DETR = {"backbone_config": {**SMALL_RESNET, "out_features": ["stage4"]}, "d_model": 32, **DETR_HEADS}
RT_DETR = {
    "backbone_config": {
        "model_type": "rt_detr_resnet",
        "embedding_size": 16,
        "hidden_sizes": [16, 32, 48, 64],
        "depths": [1, 1, 1, 1],
        "out_features": ["stage2", "stage3", "stage4"],
        "layer_type": "basic",
    },
    "encoder_in_channels": [32, 48, 64],
    "encoder_hidden_dim": 32,
    "encoder_ffn_dim": 64,
    "d_model": 32,
    "decoder_in_channels": [32, 32, 32],
    "decoder_ffn_dim": 64,
    "decoder_layers": 1,
    "decoder_attention_heads": 2,
    "num_queries": 30,
}
D_FINE = {
    "encoder_hidden_dim": 64,
    "encoder_ffn_dim": 128,
    "d_model": 64,
    "decoder_in_channels": [64, 64, 64],
    "decoder_ffn_dim": 128,
    "decoder_layers": 2,
    "decoder_attention_heads": 2,
    "num_queries": 30,
}
VIT_DETR = {
    "d_model": 64,
    "decoder_layers": 1,
    "decoder_ffn_dim": 128,
    "decoder_self_attention_heads": 2,
    "decoder_cross_attention_heads": 2,
    "num_queries": 30,
    "group_detr": 1,
}
# model_type -> the detector class, its tiny config's keys (beside the labels), the processor's keys (``class``:
# the processor its published checkpoints name, where transformers maps none to the model type). Not here:
# DAB-DETR, whose seeded decoder answers every query alike (one score per pattern, within 1e-5), so the ranks
# tie; its processor and scoring are Conditional DETR's, proven here. PaddleOCR's layout and text detectors are
# refused (their default configs: scaffold reads only the model type).
HF_DETECTORS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "detr": ("DetrForObjectDetection", DETR, {}),
    "table-transformer": ("TableTransformerForObjectDetection", DETR, {}),
    "conditional_detr": ("ConditionalDetrForObjectDetection", DETR, {}),
    "deformable_detr": ("DeformableDetrForObjectDetection", {"backbone_config": {**SMALL_RESNET,
                        "out_features": ["stage2", "stage3", "stage4"]}, "num_feature_levels": 3, "d_model": 32,
                        **DETR_HEADS, "decoder_layers": 2}, {}),
    "yolos": ("YolosForObjectDetection", {**SMALL_VIT, "image_size": [512, 864], "num_detection_tokens": 20}, {}),
    "rt_detr": ("RTDetrForObjectDetection", RT_DETR, {}),
    "rt_detr_v2": ("RTDetrV2ForObjectDetection", {**RT_DETR, "decoder_layers": 2}, {"class": "RTDetrImageProcessor"}),
    "d_fine": ("DFineForObjectDetection", D_FINE, {"class": "RTDetrImageProcessor"}),
    "deimv2": ("Deimv2ForObjectDetection", D_FINE, {}),
    "lw_detr": ("LwDetrForObjectDetection", {"backbone_config": {"model_type": "lw_detr_vit", "hidden_size": 48,
                "num_attention_heads": 2, "num_hidden_layers": 4, "out_indices": [1, 2, 3, 4],
                "window_block_indices": [0, 2]}, "projector_scale_factors": [1.0], **VIT_DETR},
                {"size": {"height": 640, "width": 640}}),
    "rf_detr": ("RfDetrForObjectDetection", {"backbone_config": {"model_type": "rf_detr_dinov2", "hidden_size": 48,
                "num_attention_heads": 2, "num_hidden_layers": 4, "out_indices": [1, 2, 3, 4],
                "window_block_indexes": [0, 2]}, **VIT_DETR}, {"size": {"height": 560, "width": 560}}),
    "pp_doclayout_v3": ("PPDocLayoutV3ForObjectDetection", {}, {}),
    "pp_ocrv5_mobile_det": ("PPOCRV5MobileDetForObjectDetection", {}, {}),
}  # fmt: skip


def quiet_transformers() -> Any:
    """transformers, without the progress bars ``save_pretrained`` draws into the sweep's output."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return transformers


def hf_folder(model_type: str, spec: tuple[str, dict[str, Any], dict[str, Any]], task: str) -> Callable[..., Built]:
    """A Hugging Face ``save_pretrained`` folder of ``model_type`` with its default image processor."""

    def build(folder: Path, photos: Sequence[Image.Image]) -> Built:
        transformers = quiet_transformers()

        class_name, config_keys, processor_keys = spec
        kind = model_type.removesuffix("_teacher")
        model = _seeded_model(transformers, kind, class_name, config_keys)
        processor = _processor(transformers, kind, processor_keys)
        target = folder / f"hf_{model_type}_{task}"
        transform = None
        if task == "classification":

            def transform(image: Image.Image) -> torch.Tensor:
                return processor(images=image, return_tensors="pt")["pixel_values"][0]

            sensitize(model, torch.stack([transform(p) for p in photos]))
            reference: Callable[[Image.Image], Any] = torch_pipeline(model, transform)
        else:
            reference = _semantic_reference(model, processor)
        model.save_pretrained(str(target))
        processor.save_pretrained(str(target))
        return Built({"PT": str(target)}, reference, transform=transform)

    return build


def hf_detector(model_type: str, spec: tuple[str, dict[str, Any], dict[str, Any]]) -> Callable[..., Built]:
    """A Hugging Face ``save_pretrained`` detector folder of ``model_type`` with its default image processor;
    the owner's pipeline is the processor, the model and ``post_process_object_detection`` at threshold 0."""

    def build(folder: Path, photos: Sequence[Image.Image]) -> Built:
        transformers = quiet_transformers()

        class_name, config_keys, processor_keys = spec
        model = _seeded_model(transformers, model_type, class_name, config_keys)
        processor = _processor(transformers, model_type, processor_keys)
        target = folder / f"hf_{model_type}_detection"
        model.save_pretrained(str(target))
        processor.save_pretrained(str(target))

        def reference(image: Image.Image) -> list[dict[str, Any]]:
            with torch.inference_mode():
                outputs = model(**processor(images=image, return_tensors="pt"))
            (found,) = processor.post_process_object_detection(
                outputs, threshold=0.0, target_sizes=[(image.height, image.width)]
            )
            order = torch.argsort(found["scores"], descending=True, stable=True)[:10]
            boxes = found["boxes"][order].clone()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)  # the kit clips boxes to the image
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
            return [
                {"index": int(found["labels"][i]), "score": float(found["scores"][i]), "box": box.tolist()}
                for i, box in zip(order, boxes)
            ]

        return Built({"PT": str(target)}, reference, {"score_threshold": 0.0, "max_detections": 10})

    return build


def _seeded_model(transformers: Any, kind: str, class_name: str, config_keys: dict[str, Any]) -> Any:
    """``class_name`` built (seed 0, eval mode) from ``kind``'s config with the sweep's labels and ``config_keys``."""
    config = transformers.AutoConfig.for_model(
        kind, num_labels=CLASSES, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()}, **config_keys
    )
    config.architectures = [class_name]
    torch.manual_seed(0)
    return getattr(transformers, class_name)(config).eval()


def _processor(transformers: Any, kind: str, keys: dict[str, Any]) -> Any:
    """``kind``'s image processor with ``keys``: the class ``keys['class']`` names, else the one transformers
    maps to ``kind`` (its torchvision one before its PIL one)."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    keys = dict(keys)
    name = keys.pop("class", None)
    if name is None:
        names = IMAGE_PROCESSOR_MAPPING_NAMES.get(kind) or {}
        name = names.get("torchvision") or names.get("pil") if isinstance(names, dict) else names
    return getattr(transformers, name)(**keys)


def _semantic_reference(model: Any, processor: Any) -> Callable[[Image.Image], np.ndarray]:
    def reference(image: Image.Image) -> np.ndarray:
        with torch.inference_mode():
            outputs = model(**processor(images=image, return_tensors="pt"))
        (found,) = processor.post_process_semantic_segmentation(outputs, target_sizes=[(image.height, image.width)])
        return found.numpy()

    return reference


TRANSFORMERS = [
    *(Case(f"hf_{t}", "transformers", "classification", hf_folder(t, s, "classification"))
      for t, s in HF_CLASSIFIERS.items()),
    *(Case(f"hf_{t}_seg", "transformers", "segmentation", hf_folder(t, s, "segmentation"))
      for t, s in HF_SEGMENTERS.items()),
    *(Case(f"hf_{t}_det", "transformers", "detection", hf_detector(t, s)) for t, s in HF_DETECTORS.items()),
]  # fmt: skip

CASES = [*TORCHVISION, *TIMM, *TRANSFORMERS]
# what CI serves (make test): every form the breadth issue found broken, one of each zoo and task beside them;
# make test-zoo (ZOO_SWEEP=all) serves every case
CI_NAMES = (
    "tv_resnet18", "tv_mnasnet0_5", "tv_googlenet", "tv_inception_v3", "tv_squeezenet1_1", "tv_regnet_y_400mf",
    "tv_lraspp", "tv_ssdlite", "timm_resnet18d", "timm_levit_128s", "timm_mobilevitv2_050",
    "timm_eva02_tiny_patch14_224",
    "hf_deit_teacher", "hf_levit_teacher", "hf_efficientnet", "hf_mobilenet_v2", "hf_mobilevit", "hf_convnext",
    "hf_mobilevit_seg", "hf_mobilenet_v2_seg", "hf_dpt_seg", "hf_data2vec-vision_seg", "hf_rf_detr_det",
)  # fmt: skip


def selected(which: str) -> list[Case]:
    """The cases of ``ZOO_SWEEP``: ``all``, or ``ci`` (the default)."""
    return list(CASES) if which == "all" else [case for case in CASES if case.name in CI_NAMES]


# ------------------------------------------------------------------ verdicts


def verdict(task: str, answer: Any, expected: Any) -> tuple[float, bool]:
    """The worst difference of one served answer from the owner's, and whether it holds."""
    if task == "classification":
        worst = max(abs(item["score"] - float(expected[item["index"]])) for item in answer)
        return worst, worst <= BOUND
    if task == "segmentation":
        disagree = 1.0 - pixel_agreement(answer, expected)
        return disagree, disagree <= 1 - PIXELS
    worst = 0.0
    if len(answer) < len(expected):
        return float("inf"), False
    for got, want in zip(answer, expected):
        if got["index"] != want["index"] or abs(got["score"] - want["score"]) > SCORE:
            return float("inf"), False
        worst = max(worst, *(abs(a - b) for a, b in zip(got["box"], want["box"])))
    return worst, worst <= BOX_PX


def pixel_agreement(answer: dict[str, Any], want: np.ndarray) -> float:
    """Share of pixels whose served class (from the answer's COCO RLE masks) equals the owner's."""
    from pycocotools import mask as coco_mask

    height, width = answer["size"]
    served = np.full((height, width), -1, np.int64)
    for item in answer["classes"]:
        rle = {"size": item["mask"]["size"], "counts": item["mask"]["counts"].encode()}
        served[coco_mask.decode(rle).astype(bool)] = item["index"]
    return float((served == want).mean())


def decoded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def table(rows: Sequence[Row]) -> str:
    """The sweep's table: architecture, zoo, task, worst difference, verdict (and a refusal's line)."""
    lines = ["| case | zoo | task | worst difference | verdict |", "|---|---|---|---|---|"]
    for row in rows:
        worst = "" if row.worst is None else f"{row.worst:.4f}"
        text = row.verdict + (f": {row.line}" if row.line else "")
        lines.append(f"| {row.name} | {row.zoo} | {row.task} | {worst} | {text} |")
    counts = {v: sum(r.verdict == v for r in rows) for v in ("holds", "differs", "refused", "broken")}
    lines.append("")
    lines.append(", ".join(f"{n} {v}" for v, n in counts.items()) + f" of {len(rows)}")
    return "\n".join(lines)


def noisy(image: Image.Image, seed: int = 0) -> Image.Image:
    """The image with each channel value moved by -1, 0 or +1 (seeded): the noise of one quantization level,
    which is what two correct resize kernels (Pillow's and torch's) differ by."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(image).astype(np.int16) + rng.integers(-1, 2, np.asarray(image).shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


# ------------------------------------------------------------------ the sweep, served

SWEEP_PHOTOS = ("astronaut", "coffee", "chelsea", "retina")
RETINA_SIDE = 700  # the dark fundus photo (scikit-image's is 1411 px) at a size the sweep's recipes resize from
CHUNK = 8  # models registered in the server at once (a worker each)


def sweep_photos() -> dict[str, bytes]:
    """The sweep's JPEGs (q90): three of scikit-image's photos and its dark retina fundus photo at 700 px."""
    import demo_models

    photos = demo_models.sample_photos(SWEEP_PHOTOS)
    photos["retina"] = np.asarray(Image.fromarray(photos["retina"]).resize((RETINA_SIDE,) * 2, Image.LANCZOS))
    return {name: demo_models.encode(image, "JPEG", quality=90) for name, image in photos.items()}


def scaffold_case(case: Case, built: Built, models: Path) -> str:
    """``make scaffold``'s own code in process (one Python for every case), then the keys a user would set:
    every class in a classifier's answer, a detector's threshold at 0, JPEGs decoded whole. Returns the
    refusal's line, or ''."""
    import scaffold_model
    import yaml

    from cli import error_line

    argv = ["--name", case.name, "--task", case.task, "--pt", built.make_vars["PT"], "--root", str(models)]
    for key, flag in (("ARCH", "--architecture"), ("LABELS", "--labels")):
        if key in built.make_vars:
            argv += [flag, built.make_vars[key]]
    try:
        folder, _ = scaffold_model.scaffold(scaffold_model.parse_args(argv))
    except Exception as exc:  # the line make scaffold prints
        return error_line(exc, f"scaffold from {built.make_vars['PT']}")
    document = yaml.safe_load((folder / "model-config.yaml").read_text())
    if case.task == "classification":
        document["handler"]["topk"] = CLASSES
    # the recipe against the owner's, so JPEGs decode whole: the reduced-scale decode is the kit's speed trade,
    # measured apart (docs/models.md)
    document["handler"]["limits"] = {**document["handler"].get("limits", {}), "reduced_jpeg": False}
    for key, value in built.edits.items():
        inner = document["handler"].get(key)
        document["handler"][key] = {**inner, **value} if isinstance(value, dict) and isinstance(inner, dict) else value
    document["responseTimeout"] = 300
    (folder / "model-config.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    return ""


def input_levels(folder: Path, transform: Callable[[Image.Image], torch.Tensor], data: bytes) -> float:
    """The largest difference, in 0-255 levels, between the input the kit's scaffolded classifier gives its
    model for one JPEG (``classifier_item``, its recipe as served) and the owner's transform's."""
    from servekit.config import ClassifierConfig, read_model_config
    from servekit.service import classifier_item
    from servekit.transforms import classifier_batch

    config = read_model_config(folder)
    assert isinstance(config, ClassifierConfig)
    mine = classifier_batch([classifier_item({"body": data}, config)], config)[0]
    theirs = transform(decoded(data))
    if mine.shape != theirs.shape:
        return float("inf")
    std = torch.tensor(config.std, dtype=torch.float32).view(3, 1, 1)
    return float(((mine - theirs).abs() * std * 255).max())


def judge(case: Case, built: Built, answers: dict[str, tuple[int, Any]], jpegs: dict[str, bytes], folder: Path) -> Row:
    """One served case against its owner's pipeline. A classifier holds within ``BOUND``, or within twice
    what one quantization level of noise moves the owner's own answer (:func:`noisy`), or where the input the
    kit gives its model is the owner's within ``LEVELS`` (:func:`input_levels`: two resize kernels' rounding,
    which a chaotic seeded net amplifies); the note gives each number."""
    worst, holds, notes = 0.0, True, []
    for photo, data in jpegs.items():
        status, body = answers[photo]
        if status != 200:
            return Row(case.name, case.zoo, case.task, "broken", line=f"{photo}: {status} {body}")
        image = decoded(data)
        expected = built.reference(image)
        difference, ok = verdict(case.task, body, expected)
        if case.task == "classification" and not ok:
            floor = float((built.reference(noisy(image)) - expected).abs().max())
            note = f"{photo} {difference:.3f} against a noise floor of {floor:.3f}"
            ok = difference <= 2 * floor
            if not ok and built.transform is not None:
                levels = input_levels(folder, built.transform, data)
                ok = levels <= LEVELS
                note += f", inputs within {levels:.1f} levels"
            notes.append(note)
        worst, holds = max(worst, difference), holds and ok
    return Row(case.name, case.zoo, case.task, "holds" if holds else "differs", worst, "; ".join(notes))


def run_sweep(cases: Sequence[Case], root: Path) -> list[Row]:
    """Build, scaffold and archive (``make -j2 archive``) every case, serve them through one real TorchServe
    (``CHUNK`` at a time, registered and unregistered over its management API), and judge each answer."""
    from kit import REPO, run_make
    from tsctl import TorchServe, derive_config, random_endpoints

    jpegs = sweep_photos()
    pil = [decoded(data) for data in jpegs.values()][:3]
    files, models, store = root / "files", root / "models", root / "model_store"
    rows: dict[str, Row] = {}
    built: dict[str, Built] = {}
    for case in cases:
        (files / case.name).mkdir(parents=True, exist_ok=True)
        try:
            built[case.name] = case.build(files / case.name, pil)
        except Exception as exc:  # the sweep's own model could not be made: a row, not the end of the sweep
            rows[case.name] = Row(case.name, case.zoo, case.task, "broken", line=f"{type(exc).__name__}: {exc}"[:200])
            continue
        line = scaffold_case(case, built[case.name], models)
        if line:
            rows[case.name] = Row(case.name, case.zoo, case.task, "refused", line=line)
    result = run_make("-j2", "archive", MODELS=models, STORE=store)
    if result.returncode != 0:
        raise RuntimeError(f"make archive failed: {result.stderr[-2000:]}")
    served = [case for case in cases if case.name not in rows]
    workdir = root / "torchserve"
    workdir.mkdir(exist_ok=True)
    overrides = {**random_endpoints().properties(), "enable_model_api": "true", "load_models": ""}  # none at start
    config = derive_config(REPO / "config.properties", workdir / "config.properties", overrides)
    server = TorchServe(workdir, config, store, [])
    server.start()
    try:
        server.management_ready()
        for start in range(0, len(served), CHUNK):
            chunk = served[start : start + CHUNK]
            answers = serve_chunk(server, [case.name for case in chunk], jpegs)
            for case in chunk:
                rows[case.name] = judge(case, built[case.name], answers[case.name], jpegs, models / case.name)
    finally:
        server.stop()
    if server.processes():
        raise RuntimeError("torchserve left processes behind")
    return [rows[case.name] for case in cases]


def serve_chunk(server: Any, names: list[str], jpegs: dict[str, bytes]) -> dict[str, dict[str, tuple[int, Any]]]:
    """Register ``names`` (one worker each), send every photo to each, unregister them."""
    import requests

    from client import KeyRing, RestClient

    keys = server.renew("management")
    management = server.endpoints.url("management")
    headers = {"Authorization": f"Bearer {keys.management}"}
    for name in names:
        params = {"url": f"{name}.mar", "model_name": name, "initial_workers": "1", "synchronous": "false"}
        reply = requests.post(f"{management}/models", params=params, headers=headers, timeout=60)
        if reply.status_code not in (200, 202):
            raise RuntimeError(f"registering {name}: {reply.status_code} {reply.text[:300]}")
    server.wait_ready(names, timeout=900)
    rest = RestClient(server.endpoints, KeyRing(server.workdir / "key_file.json"), timeout=300)
    answers = {}
    for name in names:
        answers[name] = {}
        for photo, data in jpegs.items():
            reply = rest.predict(name, data)
            answers[name][photo] = (reply.status, reply.body)
    keys = server.renew("management")
    for name in names:
        requests.delete(
            f"{management}/models/{name}", headers={"Authorization": f"Bearer {keys.management}"}, timeout=180
        )
    return answers
