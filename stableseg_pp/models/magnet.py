"""MAGNET (Seg4Diff): LoRA on a diffusion backbone's attention projections, trained with its own objective (flow
matching for an MM-DiT) plus a focal + dice loss on the grounding expert's image-to-text attention logits.

Each rank loads the backbone itself (``configure_model``); only the adapters are
trained, and only they go into checkpoints (``on_save_checkpoint``), so a
checkpoint of SD3 Medium holds a few MB, not the 2 B frozen weights.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from stableseg_pp.backbones.base import AttentionStore, CaptureRequest, TextConditioning, TrainableBackbone
from stableseg_pp.backbones.prompts import build_prompt
from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.methods.magnet_losses import PAIRINGS, mask_loss
from stableseg_pp.runtime.errors import ConfigError

LORA_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def lora_target_modules(denoiser: torch.nn.Module, sites: Sequence[str], projections: Sequence[str]) -> list[str]:
    """The full module paths of ``projections`` (e.g. ``to_q``) of every attention site in ``sites``."""
    names = dict(denoiser.named_modules())
    targets = [f"{site}.{p}" for site in sites for p in projections if f"{site}.{p}" in names]
    if not targets:
        raise ConfigError(f"magnet.lora.projections={list(projections)}: none of them exists in the sites {list(sites)[:4]}")
    return targets


class MagnetModule(L.LightningModule):
    """LoRA fine-tuning of a backbone's denoiser with its training objective plus MAGNET's mask loss.

    Args:
        backbone: a :class:`~stableseg_pp.backbones.base.TrainableBackbone` (loaded on each rank in ``configure_model``).
        expert_site: the site whose pre-softmax image-to-text logits take the mask loss (the grounding expert).
        lora_sites: the sites whose attention projections get adapters.
        rank / alpha: LoRA rank and scale (``lora_alpha``).
        projections: the projections of each site that get adapters.
        prompt_template / joiner: how class names become prompts (stage 0's settings).
        flow_matching / focal / dice: weights of the loss parts (Seg4Diff: 1.0, 0.1, 0.2).
        mask_weight: lambda, the weight of the whole mask loss.
        focal_alpha / focal_gamma: the focal loss's class balance and focusing exponent.
        pairing: ``prompt`` (the class prompts fix which tokens go with which mask) or ``hungarian``.
        objective: settings of the backbone's training objective (``training_sample``: time sampling scheme, ...).
        lr / weight_decay: AdamW.
        gradient_checkpointing: recompute activations in the backward pass (less memory, more time).
        eval_seed: seeds the noise and times of the held-out flow-matching loss (the same draw every evaluation).
        text_cache: how many class lists' encodings to keep (the text encoders are frozen: as diffusers' SD3 LoRA
            script precomputes prompt embeddings, each class list is encoded once; 0 = keep only the batch's).
    """

    def __init__(
        self,
        backbone: TrainableBackbone,
        expert_site: str,
        lora_sites: Sequence[str],
        rank: int = 16,
        alpha: float = 16.0,
        projections: Sequence[str] = LORA_PROJECTIONS,
        prompt_template: str = "a photo of a {}",
        joiner: str = " and ",
        flow_matching: float = 1.0,
        focal: float = 0.1,
        dice: float = 0.2,
        mask_weight: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        pairing: str = "prompt",
        objective: Mapping[str, Any] | None = None,
        lr: float = 1e-5,
        weight_decay: float = 1e-2,
        gradient_checkpointing: bool = False,
        eval_seed: int = 0,
        text_cache: int = 512,
    ):
        super().__init__()
        if not isinstance(backbone, TrainableBackbone):
            raise ConfigError(
                f"diffusion={backbone.name}: the {backbone.family} family has no training objective and adapter format "
                "for MAGNET; use an MM-DiT preset (diffusion=miniature_mmdit, sd3_medium, sd35_medium, sd35_large)"
            )
        if pairing not in PAIRINGS:
            raise ConfigError(f"magnet.pairing={pairing}: use one of {', '.join(PAIRINGS)}")
        self.backbone = backbone
        self.expert_site = expert_site
        self.lora_sites = list(lora_sites)
        self.rank, self.alpha, self.projections = int(rank), float(alpha), list(projections)
        self.prompt_template, self.joiner = prompt_template, joiner
        self.weights = {"flow_matching": flow_matching, "focal": focal, "dice": dice, "mask": mask_weight}
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.pairing = pairing
        self.objective = dict(objective or {})
        self.lr, self.weight_decay = lr, weight_decay
        self.gradient_checkpointing = gradient_checkpointing
        self.eval_seed = eval_seed
        self.text_cache = int(text_cache)
        self._texts: OrderedDict[tuple[bool, tuple[str, ...]], TextConditioning] = OrderedDict()
        self.store = AttentionStore()
        self.parts: torch.nn.ModuleDict | None = None
        self.strict_loading = False  # checkpoints hold the adapters only

    # -- model ------------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if self.parts is not None:
            return
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        backbone = self.backbone.load()
        denoiser = backbone.denoiser
        targets = lora_target_modules(denoiser, self.lora_sites, self.projections)
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights="gaussian", target_modules=targets)
        denoiser.add_adapter(config)
        cast_training_params(denoiser, dtype=torch.float32)  # adapters in float32 whatever the base weights are
        if self.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        self.parts = torch.nn.ModuleDict(backbone.modules())
        backbone.install_capture(CaptureRequest(text_logits=(self.expert_site,)), self.store)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.backbone.denoiser)

    def lora_metadata(self) -> dict:
        return self.backbone.denoiser.peft_config["default"].to_dict()

    @contextmanager
    def adapters(self, enabled: bool):
        """Run with the adapters on or off (off = the base model: the "before" of every comparison)."""
        denoiser = self.backbone.denoiser
        if enabled:
            yield
            return
        denoiser.disable_adapters()
        try:
            yield
        finally:
            denoiser.enable_adapters()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    # -- steps ------------------------------------------------------------------------------------------------------

    def _encode(self, names: Sequence[Sequence[str]], captions: bool) -> TextConditioning:
        """The batch's text conditioning: class prompts as stage 0 encodes them, or (``captions``) the class names
        joined as the pipeline encodes a prompt for generation. Each class list is encoded once (cached)."""
        backbone = self.backbone
        keys = [(captions, tuple(n)) for n in names]
        missing = list(dict.fromkeys(k for k in keys if k not in self._texts))
        if missing:
            lists = [list(k[1]) for k in missing]
            with torch.no_grad():
                if captions:
                    text = backbone.encode_captions([build_prompt(n, self.prompt_template, self.joiner) for n in lists])
                else:
                    text = backbone.encode_text(lists, self.prompt_template, self.joiner)
            for i, key in enumerate(missing):
                k = len(key[1]) if not captions else 0
                self._texts[key] = TextConditioning(
                    tree_map(lambda t, i=i: t[i : i + 1], text.embeddings), text.token_weights[i : i + 1, :, :k],
                    text.valid[i : i + 1, :k],
                )  # fmt: skip
        for key in keys:
            self._texts.move_to_end(key)
        parts = [self._texts[k] for k in keys]
        while len(self._texts) > max(self.text_cache, len(set(keys))):
            self._texts.popitem(last=False)
        width = max(p.token_weights.shape[-1] for p in parts)
        return TextConditioning(
            tree_map(lambda *rows: torch.cat(rows), *[p.embeddings for p in parts]),
            torch.cat([F.pad(p.token_weights, (0, width - p.token_weights.shape[-1])) for p in parts]),
            torch.cat([F.pad(p.valid, (0, width - p.valid.shape[-1])) for p in parts]),
        )

    def _flow_matching(self, batch: dict, generator: torch.Generator | None, captions: bool):
        backbone = self.backbone
        with torch.no_grad():
            latents = backbone.encode_images(batch["pixels"])
        text = self._encode(batch["names"], captions)
        sample = backbone.training_sample(latents, generator, **self.objective)
        self.store.reset(None if captions else text.token_weights, backbone.latent_grid(batch["pixels"].shape[-1]))
        pred = backbone.denoise(sample.noisy, sample.time, text)
        per_sample = (sample.weighting.float() * (pred.float() - sample.target.float()) ** 2).flatten(1).mean(1)
        return per_sample.mean()

    def mask_losses(self, logits: torch.Tensor, names: Sequence[Sequence[str]], targets: torch.Tensor):
        """Mean focal and dice loss over the images of a batch that have a mask to learn.

        logits: (B, K, h, w) the expert's class logits; targets: (B, S, S) channel ids (c + 1 = the c-th class of
        the image's prompt, 0 = none of them, 255 = ignored)."""
        focal, dice, n = logits.new_zeros(()), logits.new_zeros(()), 0
        up = F.interpolate(logits.float(), size=tuple(targets.shape[-2:]), mode="bilinear", align_corners=False)
        for b, image_names in enumerate(names):
            target = targets[b]
            valid = target != IGNORE_INDEX
            if not valid.any():
                continue
            k = len(image_names)
            if self.pairing == "prompt":
                masks = torch.stack([target == c + 1 for c in range(k)])
            else:  # class-agnostic: every distinct label but "none" and ignore is one mask
                labels = [v for v in target.unique().tolist() if v not in (0, IGNORE_INDEX)]
                if not labels:
                    continue
                masks = torch.stack([target == v for v in labels])
            loss = mask_loss(up[b, :k], masks, valid, self.pairing, self.focal_alpha, self.focal_gamma,
                             self.weights["focal"], self.weights["dice"])  # fmt: skip
            focal, dice, n = focal + loss.focal, dice + loss.dice, n + 1
        return focal / max(n, 1), dice / max(n, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        fm = self._flow_matching(batch, None, captions=False)
        logits = self.store.text_logits[self.expert_site]
        focal, dice = self.mask_losses(logits, batch["names"], batch["targets"])
        w = self.weights
        loss = w["flow_matching"] * fm + w["mask"] * (w["focal"] * focal + w["dice"] * dice)
        size = len(batch["names"])
        self.log("train/flow_matching", fm, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/mask_focal", focal, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/mask_dice", dice, on_step=True, on_epoch=True, batch_size=size)
        # Per step for the loggers only: a progress-bar value would be read from the device after every step.
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, batch_size=size)
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=size)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out flow-matching loss with the generation prompts, and the mask loss against the batch's masks;
        the noise and times are drawn from ``eval_seed`` and the batch index (the same draw at every evaluation)."""
        generator = torch.Generator().manual_seed(self.eval_seed * 100_003 + batch_idx)
        size = len(batch["names"])
        self.log("val/flow_matching", self._flow_matching(batch, generator, captions=True), batch_size=size, sync_dist=True)
        self._flow_matching(batch, torch.Generator().manual_seed(self.eval_seed * 100_003 + batch_idx), captions=False)
        focal, dice = self.mask_losses(self.store.text_logits[self.expert_site], batch["names"], batch["targets"])
        self.log("val/mask_focal", focal, batch_size=size, sync_dist=True)
        self.log("val/mask_dice", dice, batch_size=size, sync_dist=True)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
