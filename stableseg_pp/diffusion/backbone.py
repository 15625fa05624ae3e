"""Loading a Stable Diffusion 1.x/2.x backbone (VAE, U-Net, text encoder, tokenizer).

One loader for the shipped miniature model, a local diffusers folder, or a hub id.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

MINIATURE_MODEL = Path(__file__).resolve().parent.parent / "assets" / "miniature_sd"
ALIASES = {"miniature": MINIATURE_MODEL}


@dataclass
class UNetBackbone:
    """The parts of a text-to-image latent diffusion model that StableSeg runs."""

    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    source: str

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> UNetBackbone:
        for module in (self.vae, self.unet, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self


def resolve_model_path(pretrained: str) -> str:
    """Map an alias to its folder; return a local folder or a hub id unchanged."""
    if pretrained in ALIASES:
        return str(ALIASES[pretrained])
    return pretrained


def load_unet_backbone(pretrained: str, dtype: torch.dtype = torch.float32) -> UNetBackbone:
    """Load ``pretrained`` (alias, local folder or hub id) with diffusers."""
    from diffusers import StableDiffusionPipeline

    source = resolve_model_path(pretrained)
    local = Path(source).expanduser()
    is_local = local.exists()
    if is_local and not (local / "model_index.json").exists():
        raise FileNotFoundError(
            f"{local} is not a diffusers pipeline folder (no model_index.json); "
            "pass a folder written by save_pretrained or a hub id such as 'runwayml/stable-diffusion-v1-5'"
        )
    if not is_local and ("/" not in source or source.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"diffusion model {pretrained!r}: no such folder, and not a hub id of the form 'org/name'")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(
                str(local) if is_local else source,
                torch_dtype=dtype,
                safety_checker=None,
                requires_safety_checker=False,
                local_files_only=is_local or os.environ.get("HF_HUB_OFFLINE") == "1",
            )
    except OSError as err:
        raise OSError(
            f"could not load diffusion model {source!r}: {err}. Without network access, download it "
            "elsewhere and pass the local folder (diffusion.pretrained=/path/to/folder)"
        ) from err
    backbone = UNetBackbone(
        vae=pipe.vae,
        unet=pipe.unet,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        source=source,
    )
    for module in (backbone.vae, backbone.unet, backbone.text_encoder):
        module.eval().requires_grad_(False)
    return backbone
