"""The CLIP labeler: which classes an image holds, from a contrastive image-text model (CLIP or SigLIP through
transformers), not from the diffusion backbone.

Multi-label rule: the cosine similarity of the image with each class prompt,
minus its mean over the classes (an image's overall similarity to the prompts
cancels); a class is named where that reaches the split's threshold, set
without labels (Otsu's split of the split's scores) or given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from stableseg_pp.backbones.loading import model_identity, parse_dtype
from stableseg_pp.backbones.prompts import build_prompt
from stableseg_pp.methods.labelers.thresholds import Threshold, check_threshold, decide, split_threshold
from stableseg_pp.runtime.errors import ConfigError


class ClipLabeler:
    """A CLIP/SigLIP checkpoint as a zero-shot multi-label classifier.

    Args:
        model: a transformers checkpoint (hub id such as ``openai/clip-vit-large-patch14``, or a local folder) with
            its tokenizer and image processor.
        prompt_template: each class's prompt (one ``{}`` for its name).
        threshold: ``otsu`` (Otsu's split of the split's scores), ``otsu_per_class`` (each class's own split) or a
            fixed score in (-1, 1).
        dtype: the model's weights (``float32``, ``float16``, ``bfloat16``).
    """

    name = "clip"
    evidence = None  # scores the pictures
    confidences = False  # its labels are not weighed (relative_confidence would apply; unmeasured without real weights)
    second_opinion = False  # decides from its own scores alone
    needs_backbone = False  # with its own model, not the diffusion backbone

    def __init__(self, model: str = "openai/clip-vit-large-patch14", prompt_template: str = "a photo of a {}",
                 threshold: str | float = "otsu", dtype: str = "float32"):  # fmt: skip
        if not isinstance(model, str) or not model:
            raise ConfigError(f"labeler.model={model!r}: give a CLIP/SigLIP checkpoint (hub id or folder)")
        if not isinstance(prompt_template, str) or prompt_template.count("{}") != 1:
            raise ConfigError(f"labeler.prompt_template={prompt_template!r}: give a text with one {{}} for the class name")
        check_threshold(threshold, -1.0, 1.0)
        self.model_name, self.prompt_template, self.threshold = model, prompt_template, threshold
        self.dtype = parse_dtype(dtype)
        self.model = self.tokenizer = None
        self._pixels: dict = {}

    def identity(self) -> dict:
        """What the scores depend on besides the settings: the checkpoint's content (a folder) or its hub id."""
        return model_identity(self.model_name)

    def load(self, device: torch.device) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        try:
            self.model = AutoModel.from_pretrained(self.model_name, dtype=self.dtype).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_name)
            processor = AutoImageProcessor.from_pretrained(self.model_name)
        except OSError as err:
            raise ConfigError(f"labeler.model={self.model_name}: cannot load it ({str(err).splitlines()[0]}); give a "
                              "local folder, or a hub id with the hub reachable (HF_HUB_OFFLINE unset)") from err  # fmt: skip
        self._pixels = {"side": _input_side(processor), "mean": list(processor.image_mean), "std": list(processor.image_std)}

    def _features(self, output) -> torch.Tensor:
        """``get_*_features`` as a tensor (some transformers versions return a model output)."""
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    @torch.no_grad()
    def score_pictures(self, pixels: torch.Tensor, ids: Sequence[str], names: Sequence[str], backbone=None) -> torch.Tensor:
        """(B, 3, R, R) pictures in [-1, 1] -> (B, K) scores of the K class ``names``."""
        if self.model is None:
            raise RuntimeError("ClipLabeler.load(device) first")
        model, p = self.model, self._pixels
        device = next(model.parameters()).device
        images = F.interpolate((pixels.float().to(device) + 1) / 2, size=(p["side"], p["side"]), mode="bicubic",
                               antialias=True, align_corners=False).clamp(0, 1)  # fmt: skip
        mean = torch.tensor(p["mean"], device=device).view(1, 3, 1, 1)
        std = torch.tensor(p["std"], device=device).view(1, 3, 1, 1)
        image = self._features(model.get_image_features(pixel_values=((images - mean) / std).to(model.dtype)))
        prompts = [build_prompt([n], self.prompt_template) for n in names]
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, return_tensors="pt").to(device)
        text = self._features(model.get_text_features(**tokens))
        similarity = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
        return similarity - similarity.mean(1, keepdim=True)

    def fit_threshold(self, scores: Sequence[Mapping[int, float]]) -> Threshold:
        return split_threshold(self.threshold, scores)

    decide = staticmethod(decide)


def _input_side(processor) -> int:
    """The square side the image processor feeds the model (its crop, else its resize)."""
    for size in (getattr(processor, "crop_size", None), getattr(processor, "size", None)):
        if isinstance(size, int):
            return size
        for key in ("height", "shortest_edge"):
            value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
            if value:
                return int(value)
    raise ConfigError(f"{type(processor).__name__}: no image size in its config; give a CLIP/SigLIP checkpoint")
