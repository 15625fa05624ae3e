"""Which attention layers a diffusers U-Net has, and at what resolution each one works."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionLayer:
    """One attention processor slot of a U-Net."""

    name: str  # key of ``unet.attn_processors``
    kind: str  # "self" (attn1) or "cross" (attn2)
    factor: int  # downsampling of this layer's map relative to the latent

    def side(self, latent_side: int) -> int:
        """Map side length for a square latent of ``latent_side``."""
        return latent_side // self.factor


def unet_attention_layers(unet) -> list[AttentionLayer]:
    """Describe every attention layer of a ``UNet2DConditionModel``.

    Down block ``i`` works at latent/2^i, the mid block at the coarsest level,
    up block ``i`` mirrors down block ``n-1-i`` (each block but the last one
    downsamples, as in every Stable Diffusion 1.x/2.x U-Net).
    """
    n_down = len(unet.config.down_block_types)
    n_up = len(unet.config.up_block_types)
    layers = []
    for name in unet.attn_processors:
        parts = name.split(".")
        if parts[0] == "down_blocks":
            factor = 2 ** int(parts[1])
        elif parts[0] == "up_blocks":
            factor = 2 ** (n_up - 1 - int(parts[1]))
        elif parts[0] == "mid_block":
            factor = 2 ** (n_down - 1)
        else:
            raise ValueError(f"unexpected attention layer {name!r}: not a U-Net down, mid or up block")
        kind = "cross" if ".attn2." in name else "self"
        layers.append(AttentionLayer(name=name, kind=kind, factor=factor))
    return layers


def select_layers(
    layers: Iterable[AttentionLayer], kind: str, sides: Iterable[int] | str, latent_side: int
) -> list[AttentionLayer]:
    """Layers of ``kind`` whose map side (for ``latent_side``) is in ``sides`` ("all" = every one).

    Raises a clear error when a requested side exists in no layer.
    """
    layers = [lay for lay in layers if lay.kind == kind]
    if sides == "all":
        return layers
    wanted = {int(s) for s in sides}
    available = sorted({lay.side(latent_side) for lay in layers})
    missing = wanted - set(available)
    if missing:
        raise ValueError(
            f"{kind}-attention scales {sorted(missing)} do not exist for a {latent_side}x{latent_side} latent; "
            f"available map sides: {available}"
        )
    return [lay for lay in layers if lay.side(latent_side) in wanted]
