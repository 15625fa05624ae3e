"""StableSeg: zero-shot segmentation from one U-Net forward (METHOD.md section 1).

Image -> VAE latent (no noise by default) -> one U-Net forward at timestep t
with a prompt naming the classes -> per-layer cross-attention class maps (CAPM)
and Query/Key features of the self-attention layers (SAR) -> class scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from stableseg_pp.attention.capm import aggregate_maps, minmax_normalize, with_background
from stableseg_pp.attention.sar import sar_probabilities
from stableseg_pp.diffusion.backbone import UNetBackbone
from stableseg_pp.diffusion.capture import AttentionStore, CrossAttentionMapProcessor, SelfAttentionQKProcessor
from stableseg_pp.diffusion.layers import AttentionLayer, select_layers, unet_attention_layers
from stableseg_pp.diffusion.prompts import map_class_tokens

MODES = ("ca", "sa", "ca+sa")


@dataclass
class StableSegOutput:
    scores: torch.Tensor  # (B, 1 + C, R, R): final class scores, channel 0 = background
    valid: torch.Tensor  # (B, 1 + C) bool: channels that name a class of this image
    capm: torch.Tensor  # (B, 1 + C, R, R) normalised CAPM with background channel
    cross_maps: dict[str, torch.Tensor]  # layer -> (B, C, h, w) raw class maps (for stage 2)

    @property
    def labels(self) -> torch.Tensor:
        """(B, R, R) channel index per pixel (0 = background, c = c-th class of the image)."""
        return self.scores.masked_fill(~self.valid[:, :, None, None], float("-inf")).argmax(dim=1)


class StableSeg(torch.nn.Module):
    """Zero-shot segmenter on a diffusers ``UNet2DConditionModel`` backbone."""

    def __init__(
        self,
        backbone: UNetBackbone,
        resolution: int = 512,
        cross_scales: Sequence[int] | str = (8, 16),
        self_scales: Sequence[int] | str = "all",
        stored_cross_scales: Sequence[int] | str = "all",
        mode: str = "ca+sa",
        timestep: int = 1,
        add_noise: bool = False,
        background: str = "threshold",
        background_threshold: float = 0.55,
        background_word: str = "background",
        prompt_template: str = "a photo of a {}",
        joiner: str = " and ",
        layer_weights: Mapping[str, float] | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"stableseg mode {mode!r} is not one of {MODES}")
        if background not in ("threshold", "word", "none"):
            raise ValueError(f"background {background!r} must be 'threshold', 'word' or 'none' (datasets without one)")
        scale = backbone.vae_scale
        if resolution % (scale * 8):
            raise ValueError(f"resolution {resolution} must be a multiple of {scale * 8} for this backbone")
        self.backbone = backbone
        # registered as submodules so that .to(device) and Lightning move them
        self.vae, self.unet, self.text_encoder = backbone.vae, backbone.unet, backbone.text_encoder
        self.resolution = resolution
        self.mode = mode
        self.timestep = int(timestep)
        self.add_noise = add_noise
        self.background = background
        self.background_threshold = background_threshold
        self.background_word = background_word
        self.prompt_template = prompt_template
        self.joiner = joiner
        self.latent_side = resolution // scale
        layers = unet_attention_layers(backbone.unet)
        self.aggregated_layers = select_layers(layers, "cross", cross_scales, self.latent_side)
        stored = select_layers(layers, "cross", stored_cross_scales, self.latent_side)
        self.cross_layers: list[AttentionLayer] = [lay for lay in layers if lay in stored or lay in self.aggregated_layers]
        self.self_layers = select_layers(layers, "self", self_scales, self.latent_side) if mode != "ca" else []
        self.layer_weights = dict(layer_weights) if layer_weights else {lay.name: 1.0 for lay in self.aggregated_layers}
        unknown = set(self.layer_weights) - {lay.name for lay in self.cross_layers}
        if unknown:
            raise ValueError(f"layer_weights name layers that are not captured: {sorted(unknown)}")
        self.store = AttentionStore()
        self._install_processors()

    def _install_processors(self) -> None:
        processors = {}
        cross = {lay.name for lay in self.cross_layers}
        selfs = {lay.name for lay in self.self_layers}
        for name in self.backbone.unet.attn_processors:
            if name in cross:
                processors[name] = CrossAttentionMapProcessor(self.store, name)
            elif name in selfs:
                processors[name] = SelfAttentionQKProcessor(self.store, name)
            else:
                processors[name] = AttnProcessor2_0()
        self._processors = processors
        self.backbone.unet.set_attn_processor(dict(processors))

    def _ensure_processors(self) -> None:
        """Reinstall our processors if another user of the same U-Net replaced them."""
        name = self.cross_layers[0].name
        if self.backbone.unet.attn_processors[name] is not self._processors[name]:
            self.backbone.unet.set_attn_processor(dict(self._processors))

    def class_names_for_prompt(self, names: Sequence[str]) -> list[str]:
        return list(names) + ([self.background_word] if self.background == "word" else [])

    def encode_prompts(self, class_names: Sequence[Sequence[str]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text embeddings (B, T, D), token weights (B, T, K) and class validity (B, K)."""
        tok = self.backbone.tokenizer
        length = tok.model_max_length
        mapped = [
            map_class_tokens(tok, self.class_names_for_prompt(names), self.prompt_template, self.joiner) for names in class_names
        ]
        k = max(len(m.positions) for m in mapped)
        ids = torch.full((len(mapped), length), tok.pad_token_id, dtype=torch.long)
        weights = torch.zeros(len(mapped), length, k)
        valid = torch.zeros(len(mapped), k, dtype=torch.bool)
        for i, m in enumerate(mapped):
            ids[i, : len(m.input_ids)] = torch.tensor(m.input_ids)
            weights[i, :, : len(m.positions)] = m.weight_matrix(length)
            valid[i, : len(m.positions)] = True
        emb = self.backbone.text_encoder(ids.to(device))[0]
        return emb, weights.to(device), valid.to(device)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) in [-1, 1] -> scaled latent mean (no sampling)."""
        vae = self.backbone.vae
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def forward(
        self, pixels: torch.Tensor, class_names: Sequence[Sequence[str]], generator: torch.Generator | None = None
    ) -> StableSegOutput:
        if pixels.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"expected images of {self.resolution}x{self.resolution}, got {tuple(pixels.shape[-2:])}")
        unet = self.backbone.unet
        emb, token_weights, valid = self.encode_prompts(class_names, pixels.device)
        latents = self.encode_images(pixels)
        t = torch.full((latents.shape[0],), self.timestep, device=latents.device, dtype=torch.long)
        if self.add_noise:
            noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            latents = self.backbone.scheduler.add_noise(latents, noise, t)
        self._ensure_processors()
        self.store.reset(token_weights, tuple(latents.shape[-2:]))
        unet(latents.to(unet.dtype), t, encoder_hidden_states=emb.to(unet.dtype))
        size = (self.resolution, self.resolution)
        cross = dict(self.store.cross)
        class_maps = minmax_normalize(aggregate_maps(cross, self.layer_weights, size))
        if self.background == "word":
            # the word is the last valid channel of each image: move it to channel 0
            n_valid = valid.sum(dim=1)
            capm = self._background_word_first(class_maps, n_valid)
            # channel 0 = the word, 1..n-1 = the classes: the same count of valid channels
            valid = torch.arange(valid.shape[1], device=valid.device)[None] < n_valid[:, None]
        else:  # threshold; "none": the channel is there but can never win
            capm = with_background(class_maps, self.background_threshold)
            valid = torch.cat([torch.full_like(valid[:, :1], self.background != "none"), valid], dim=1)
        capm = capm.masked_fill(~valid[:, :, None, None], 0.0)
        scores = capm
        if self.mode != "ca":
            ca_labels = capm.masked_fill(~valid[:, :, None, None], float("-inf")).argmax(dim=1)
            qk = ((q, k, self.store.map_shape(q.shape[2])) for q, k in self.store.self_qk.values())
            sapm = sar_probabilities(qk, ca_labels, valid, size)
            scores = sapm if self.mode == "sa" else capm + sapm
        self.store.self_qk.clear()
        return StableSegOutput(scores=scores, valid=valid, capm=capm, cross_maps=cross)

    @staticmethod
    def _background_word_first(class_maps: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        """Reorder channels so that each image's background-word map (its last valid one) comes first."""
        out = torch.zeros_like(class_maps)
        for i, n in enumerate(n_valid.tolist()):
            out[i, 0] = class_maps[i, n - 1]
            out[i, 1:n] = class_maps[i, : n - 1]
        return out


def resize_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, K, h, w) scores to an image's original size."""
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
