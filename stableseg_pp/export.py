"""The trained DeepLabV3+ as a file that needs only torch: a ``torch.export`` program with its class names.

``python -m stableseg_pp.predict <deeplab folder> --export segmenter.pt2`` writes it. The program takes
``(B, 3, H, W)`` uint8 RGB images (as decoded; H and W multiples of :data:`MULTIPLE`, e.g. the training
size stored with it) and returns ``(B, H, W)`` class ids (int64); the input normalisation is inside.
``stableseg_pp.json`` travels in the same file::

    import json, torch
    extra = {"stableseg_pp.json": ""}
    program = torch.export.load("segmenter.pt2", extra_files=extra)
    info = json.loads(extra["stableseg_pp.json"])  # class_names, input_size, input, output
    class_ids = program.module()(images)  # images: (B, 3, H, W) uint8 RGB
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from stableseg_pp.data.pairs import IMAGENET_MEAN, IMAGENET_STD
from stableseg_pp.runtime.atomic import atomic_save
from stableseg_pp.runtime.errors import UserError

METADATA = "stableseg_pp.json"
MULTIPLE = 32  # DeepLabV3+'s encoder (depth 5) halves the side five times: sides must divide by 2**5


class ExportedSegmenter(torch.nn.Module):
    """DeepLabV3+ with its input normalisation: uint8 RGB images in, class ids out.

    Args:
        model: the trained smp model (``DeepLabV3PlusModule.model``).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return self.model(x).argmax(1)


def export_segmenter(model: torch.nn.Module, class_names: list[str], path: Path, size: int, multiple: int = MULTIPLE) -> Path:
    """Export ``model`` (any batch size; sides multiples of ``multiple``, up to 64x ``size``) to ``path``
    (atomically), with the class names, the suggested input size and the input convention in ``stableseg_pp.json``."""
    if size <= 0 or size % multiple:
        raise UserError(f"--export-size {size}: use a positive multiple of {multiple}")
    device = next(model.parameters()).device
    wrapper = ExportedSegmenter(model).eval().to(device)
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8, device=device)
    blocks = max(2, 64 * size // multiple)
    dims = {"images": {0: torch.export.Dim("batch", min=1, max=4096),
                       2: multiple * torch.export.Dim("h_blocks", min=1, max=blocks),
                       3: multiple * torch.export.Dim("w_blocks", min=1, max=blocks)}}  # fmt: skip
    with torch.no_grad():
        program = torch.export.export(wrapper, (example,), dynamic_shapes=dims)
    info = {
        "class_names": list(class_names),
        "input_size": size,
        "input": f"(B, 3, H, W) uint8 RGB; H and W multiples of {multiple}, e.g. {size} (the training size)",
        "output": "(B, H, W) int64 class ids: position in class_names",
        "normalisation": {"mean": [m * 255 for m in IMAGENET_MEAN], "std": [s * 255 for s in IMAGENET_STD]},
    }
    extra = {METADATA: json.dumps(info, indent=2)}
    return atomic_save(path, lambda t: torch.export.save(program, t, extra_files=extra))
