"""Per-image outputs of stage 0, written atomically by a Lightning prediction writer."""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from stableseg_pp.data.palette import IGNORE_INDEX, colorize, save_palette_png
from stableseg_pp.models.zero_shot_module import ZeroShotPrediction
from stableseg_pp.pipeline.atomic import atomic_save, atomic_write_bytes, atomic_write_text


class PseudoMaskLayout:
    """Where a split's pseudo-masks, stored maps and overlays live."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.masks = self.root / "masks"
        self.maps = self.root / "maps"
        self.overlays = self.root / "overlays"

    def mask_path(self, sid: str) -> Path:
        return self.masks / f"{sid}.png"

    def maps_path(self, sid: str) -> Path:
        return self.maps / f"{sid}.npz"

    def is_done(self, sid: str) -> bool:
        """Maps are written before the mask, so a mask means both are complete."""
        return self.mask_path(sid).exists()


def overlay_png(
    image: np.ndarray,
    pred: np.ndarray,
    gt: np.ndarray | None,
    alpha: float = 0.55,
    palette: list[int] | None = None,
    background_index: int | None = 0,
) -> Image.Image:
    """Image, image blended with the pseudo-mask, and with the ground truth, side by side."""

    def blend(mask: np.ndarray) -> np.ndarray:
        col = colorize(mask, palette).astype(np.float32)
        keep = (mask == background_index) | (mask == IGNORE_INDEX)
        out = image.astype(np.float32) * (1 - alpha) + col * alpha
        out[keep] = image[keep] * 0.6 + col[keep] * 0.4 * (mask[keep, None] == IGNORE_INDEX)
        return out.clip(0, 255).astype(np.uint8)

    panels = [image, blend(pred)] + ([blend(gt)] if gt is not None else [])
    return Image.fromarray(np.concatenate(panels, axis=1))


class PseudoMaskWriter(BasePredictionWriter):
    """Writes each image's stored maps (float16 npz), then its palette PNG mask, atomically.

    ``layouts[i]`` is where the predictions of dataloader ``i`` go. At the end each
    rank appends the ids it wrote to ``<split>/ranks/rank<r>.txt``: a record of
    how the images were sharded (and a check that none was done twice).
    """

    def __init__(
        self,
        layouts: Sequence[PseudoMaskLayout],
        overlay_ids: Iterable[str] = (),
        palette: list[int] | None = None,
        background_index: int | None = 0,
    ):
        super().__init__(write_interval="batch")
        self.layouts = list(layouts)
        self.overlay_ids = set(overlay_ids)
        self.palette = palette
        self.background_index = background_index
        self.written_ids: list[list[str]] = [[] for _ in self.layouts]

    @property
    def written(self) -> int:
        return sum(len(ids) for ids in self.written_ids)

    def write_prediction(self, p: ZeroShotPrediction, layout: PseudoMaskLayout) -> None:
        buf = io.BytesIO()
        arrays = {f"map/{k}": v for k, v in p.cross_maps.items()}
        if p.scores is not None:
            arrays["scores"] = p.scores
        np.savez_compressed(buf, class_ids=np.array(p.class_ids, dtype=np.int64), **arrays)
        atomic_write_bytes(layout.maps_path(p.id), buf.getvalue())
        if p.id in self.overlay_ids:
            img = overlay_png(p.sample.image, p.mask, p.sample.mask, palette=self.palette, background_index=self.background_index)
            atomic_save(layout.overlays / f"{p.id}.png", lambda t, im=img: im.save(t, format="PNG"))
        atomic_save(layout.mask_path(p.id), lambda t: save_palette_png(p.mask, t, self.palette))

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for p in prediction:
            self.write_prediction(p, self.layouts[dataloader_idx])
            self.written_ids[dataloader_idx].append(p.id)

    def on_predict_end(self, trainer, pl_module) -> None:
        for layout, ids in zip(self.layouts, self.written_ids, strict=True):
            record = layout.root / "ranks" / f"rank{trainer.global_rank}.txt"
            before = record.read_text() if record.exists() else ""
            atomic_write_text(record, before + "".join(f"{i}\n" for i in ids))


@dataclass
class StoredMaps:
    """What :class:`PseudoMaskWriter` stored for one image."""

    class_ids: list[int]  # dataset ids of channels 1.. (channel 0 = background)
    cross_maps: dict[str, np.ndarray]  # layer -> (C, h, w)
    scores: np.ndarray | None  # (1 + C, h, w) final scores at the latent resolution


def load_stored_maps(path: str | Path) -> StoredMaps:
    """Read back what :class:`PseudoMaskWriter` stored for one image."""
    with np.load(path) as data:
        maps = {k[len("map/") :]: data[k] for k in data.files if k.startswith("map/")}
        scores = data["scores"] if "scores" in data.files else None
        return StoredMaps(data["class_ids"].tolist(), maps, scores)


def write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2).encode())
