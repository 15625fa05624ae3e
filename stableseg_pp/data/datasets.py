"""The configured dataset: its layout, its class names, its splits (and the miniature world, written on first use)."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from stableseg_pp.data.layouts import DatasetLayout, VOCLayout
from stableseg_pp.data.miniature import write_miniature_voc
from stableseg_pp.data.segmentation import SegmentationDataset

log = logging.getLogger(__name__)


def build_layout(data: DictConfig) -> DatasetLayout:
    """``data.layout`` (a ``_target_`` node) at ``data.root``; the VOC layout when none is configured."""
    spec = data.get("layout")
    if spec is None:
        return VOCLayout(data.root)
    return instantiate(spec, root=data.root, _convert_="all")


def background_index(data: DictConfig) -> int | None:
    return data.get("background_index", 0)


def prepare_dataset(data: DictConfig, splits: list[str] | None = None) -> Path:
    """Check the dataset folder (writing the miniature world on first use); fill in class names read from it."""
    root = Path(data.root)
    gen = data.get("generate")
    if gen:
        if not (root / "miniature.json").exists():
            log.info("writing the miniature world to %s", root)
        write_miniature_voc(root, **gen)
    layout = build_layout(data)
    layout.check(list(splits or ["train", "val"]))
    if data.get("class_names") is None:
        names = layout.class_names()
        if not names:
            raise ValueError(f"dataset {data.name}: set data.class_names (the dataset has no class list file)")
        with open_dict(data):
            data.class_names = names
    return root


def split_ids(data: DictConfig, split: str) -> list[str]:
    """Ids of ``split``, cut to ``data.limit`` when set."""
    ids = build_layout(data).split_ids(split)
    limit = data.get("limit")
    return ids[: int(limit)] if limit else ids


def build_dataset(data: DictConfig, split: str, resolution: int, ids: list[str]) -> SegmentationDataset:
    return SegmentationDataset(
        layout=build_layout(data),
        split=split,
        class_names=list(data.class_names),
        resolution=resolution,
        labels=data.labels,
        require_masks=data.require_masks,
        on_bad_input=data.on_bad_input,
        convert_to_rgb=data.convert_to_rgb,
        ids=ids,
        background_index=background_index(data),
    )


def protocol(data: DictConfig, split: str) -> dict:
    """The evaluation setting, written into every metrics file: numbers are comparable only when it matches."""
    bg = background_index(data)
    return {
        "dataset": data.name,
        "split": build_layout(data).dataset_split(split),
        "classes": len(data.class_names),
        "background": "none" if bg is None else ("counted" if data.get("eval_background", True) else "ignored"),
        "labels": data.labels,
        "label_map": OmegaConf.to_container(label_map) if (label_map := OmegaConf.select(data, "layout.label_map")) else None,
    }
