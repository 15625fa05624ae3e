"""Building the configured dataset (and writing the miniature world when it is missing)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from stableseg_pp.data.miniature import write_miniature_voc
from stableseg_pp.data.voc import VOCSegmentation, read_split_ids

log = logging.getLogger(__name__)


def prepare_dataset(data: DictConfig) -> Path:
    """The dataset root; the miniature world is generated there on first use."""
    root = Path(data.root)
    gen = data.get("generate")
    if gen:
        if not (root / "miniature.json").exists():
            log.info("writing the miniature world to %s", root)
        write_miniature_voc(root, **gen)
    elif not root.is_dir():
        raise FileNotFoundError(f"dataset {data.name}: folder {root} does not exist; set data.root or see docs/datasets.md")
    return root


def split_ids(data: DictConfig, split: str) -> list[str]:
    """Ids of ``split``, cut to ``data.limit`` when set."""
    ids = read_split_ids(Path(data.root), split)
    limit = data.get("limit")
    return ids[: int(limit)] if limit else ids


def build_dataset(data: DictConfig, split: str, resolution: int, ids: list[str]) -> VOCSegmentation:
    return VOCSegmentation(
        root=data.root,
        split=split,
        class_names=list(data.class_names),
        resolution=resolution,
        labels=data.labels,
        require_masks=data.require_masks,
        on_bad_input=data.on_bad_input,
        convert_to_rgb=data.convert_to_rgb,
        ids=ids,
    )
