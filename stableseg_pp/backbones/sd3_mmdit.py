"""The MM-DiT family (Stable Diffusion 3 / 3.5): VAE with shift, ``SD3Transformer2DModel``, CLIP-L, CLIP-G, optional T5.

One implementation of :class:`~stableseg_pp.backbones.base.DiffusionBackbone`
(docs/mmdit.md). SD3 has no cross-attention: every block runs one joint
attention over ``[image tokens, text tokens]``; SD3.5 adds an image-only
attention (``attn2``) in its first blocks. Sites: ``transformer_blocks.<i>.attn``
(joint, depth i) and ``transformer_blocks.<i>.attn2`` (self, depth i).

Two text-conditioning schemes:

* ``per_class`` (the SD3 zero-shot paper): each class prompt ``template % name``
  through CLIP-L, CLIP-G and T5, the name's tokens summed into one vector per
  encoder, placed at positions 1..k (CLIP, after BOS) and 0..k-1 (T5), the empty
  prompt's embeddings elsewhere. All class prompts of a batch go through each
  encoder in one pass with the hopping mask (:mod:`.hopping`).
* ``joined`` (Seg4Diff): the class names joined in one prompt, encoded exactly
  as ``StableDiffusion3Pipeline.encode_prompt``; a class map is the mean over its tokens.

A class map is the mean of its CLIP and T5 maps (T5 present) or its CLIP map.
SD3 has no text attention mask: padding tokens take part in the joint softmax
as in generation, and only class columns are read.

Time: the clean latent with the transformer told ``timestep`` (default 1), or
flow-matching noise at step ``noise_step`` of ``num_inference_steps`` of the
model's scheduler (``scale_noise``, seeded by the caller).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0

from stableseg_pp.backbones.base import (
    AttentionSite,
    AttentionStore,
    CaptureRequest,
    Generators,
    ModulationState,
    TextConditioning,
    TrainingSample,
    draw_noise,
    vae_latents,
    vae_pixels,
)
from stableseg_pp.backbones.capture import SelfAttentionQKProcessor
from stableseg_pp.backbones.flow_matching import (
    FlowMatchingNoise,
    FlowMatchingSampler,
    TransformerSettings,
    whole_number,
)
from stableseg_pp.backbones.hopping import additive_mask, encode_packed
from stableseg_pp.backbones.installer import ProcessorInstaller, SiteCapture
from stableseg_pp.backbones.joint_capture import IMAGE_FIRST, JointAttentionMapProcessor
from stableseg_pp.backbones.loading import (
    LORA_FILE,
    apply_lora,
    lora_identity,
    model_identity,
    offline_hint,
    pipeline_folder_or_hub_id,
)
from stableseg_pp.backbones.modulation import ModulatedJointAttentionProcessor
from stableseg_pp.backbones.prompts import PromptTooLongError, build_prompt, map_class_tokens
from stableseg_pp.runtime.errors import ConfigError, one_line

EXAMPLE_HUB_ID = "stabilityai/stable-diffusion-3-medium-diffusers"


def mmdit_sites(transformer, latent_hw: tuple[int, int]) -> list[AttentionSite]:
    """Every attention site of an ``SD3Transformer2DModel``, in forward order: per block its joint attention, then
    (SD3.5's dual-attention blocks) its image-only ``attn2``. Depth = block index."""
    p = transformer.config.patch_size
    grid = (latent_hw[0] // p, latent_hw[1] // p)
    sites = []
    for i, block in enumerate(transformer.transformer_blocks):
        sites.append(AttentionSite(f"transformer_blocks.{i}.attn", "joint", grid, i, block.attn.heads))
        if getattr(block, "attn2", None) is not None:
            sites.append(AttentionSite(f"transformer_blocks.{i}.attn2", "self", grid, i, block.attn2.heads))
    return sites


def absent_components(index: dict[str, Any]) -> set[str]:
    """The components a pipeline's ``model_index.json`` lists as ``[null, null]`` (e.g. a model without T5)."""
    return {k for k, v in index.items() if isinstance(v, list | tuple) and list(v) == [None, None]}


class SD3Backbone(TransformerSettings, FlowMatchingNoise, FlowMatchingSampler):
    """Stable Diffusion 3 / 3.5 (and the miniature MM-DiT) behind the backbone interface.

    Args:
        name: the preset's name (``diffusion.name``).
        pretrained: ``miniature_mmdit``, a local diffusers folder, or a hub id.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        use_t5: load and use T5 (False: ``text_encoder_3=None``, its tokens are zeros as in the pipeline; saves memory).
        t5_tokens: T5's sequence length (the pipeline's ``max_sequence_length``).
        conditioning: ``per_class`` (class vectors, SD3 zero-shot paper) or ``joined`` (one prompt, Seg4Diff).
        attention_maps: ``both`` (image-to-text averaged with transposed text-to-image, SD3 zero-shot paper),
            ``image_to_text`` (Seg4Diff) or ``output_space`` (ConceptAttention's scores, docs/flux.md).
        timestep: what the transformer is told for a clean latent (0..1000 scale; 1 = almost clean).
        add_noise: flow-matching noise at step ``noise_step`` of ``num_inference_steps`` instead (Seg4Diff: 8 of 28).
        lora: a diffusers-format LoRA of the transformer (e.g. a MAGNET step folder), loaded with the pipeline's
            ``load_lora_weights`` and fused; its fingerprint is part of :meth:`identity`.
    """

    family = "sd3_mmdit"

    def __init__(
        self,
        name: str = "sd3_mmdit",
        pretrained: str = "miniature_mmdit",
        dtype: str = "float32",
        use_t5: bool = True,
        t5_tokens: int = 256,
        conditioning: str = "per_class",
        attention_maps: str = "both",
        timestep: float = 1.0,
        add_noise: bool = False,
        num_inference_steps: int = 28,
        noise_step: int = 8,
        lora: str | None = None,
    ):
        if not 0 <= whole_number("t5_tokens", t5_tokens, 0) <= 512 or (use_t5 and int(t5_tokens) == 0):
            raise ConfigError(
                f"diffusion.t5_tokens={t5_tokens}: give T5's sequence length, 1 to 512 (e.g. 77 or 256; 0 only with use_t5=false)"
            )
        self._set_settings(name, pretrained, dtype, t5_tokens, conditioning, attention_maps, timestep, add_noise,
                           num_inference_steps, noise_step, lora)  # fmt: skip
        self.use_t5 = bool(use_t5)
        self.vae = self.transformer = self.scheduler = None
        self.text_encoders: list = []  # CLIP-L, CLIP-G
        self.tokenizers: list = []
        self.text_encoder_3 = self.tokenizer_3 = None
        self._processors = ProcessorInstaller(JointAttnProcessor2_0, "this transformer")
        self._meta: SimpleNamespace | None = None
        self._schedule: tuple | None = None  # ((scheduler id, steps), the noising schedule)
        self._train_schedule: tuple | None = None  # (key, the schedule as trained)

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> SD3Backbone:
        """A backbone from a ``StableDiffusion3Pipeline`` already built (tests, the miniature model's training)."""
        backbone = cls(**kwargs)
        backbone._set_components(pipe)
        return backbone

    def _set_components(self, pipe) -> None:
        self.vae, self.transformer, self.scheduler = pipe.vae, pipe.transformer, pipe.scheduler
        self.text_encoders = [pipe.text_encoder, pipe.text_encoder_2]
        self.tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
        if self.use_t5:
            self.text_encoder_3, self.tokenizer_3 = pipe.text_encoder_3, pipe.tokenizer_3
        self._meta = None

    @property
    def loaded(self) -> bool:
        return self.transformer is not None

    def load(self) -> SD3Backbone:
        if self.loaded:
            return self
        from diffusers import StableDiffusion3Pipeline

        source, is_local = pipeline_folder_or_hub_id(self.pretrained, EXAMPLE_HUB_ID)
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        skip_t5 = {} if self.use_t5 else {"text_encoder_3": None, "tokenizer_3": None}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
                index = StableDiffusion3Pipeline.load_config(source, local_files_only=is_local or offline)
                # components the model does not have (e.g. the miniature's T5) are passed as None explicitly
                absent = dict.fromkeys(absent_components(index))
                pipe = StableDiffusion3Pipeline.from_pretrained(
                    source, torch_dtype=self.dtype, local_files_only=is_local or offline, **(absent | skip_t5)
                )
        except (OSError, ValueError) as err:
            raise ConfigError(offline_hint(self.pretrained, one_line(err))) from err
        if self.use_t5 and pipe.text_encoder_3 is None:
            raise self._no_t5_error()
        if self.lora:
            apply_lora(pipe, self.lora)
        self._set_components(pipe)
        for module in self.modules().values():
            module.eval().requires_grad_(False)
        return self

    def _no_t5_error(self) -> ConfigError:
        return ConfigError(
            f"diffusion.use_t5=true, but diffusion.pretrained={self.pretrained} has no T5 (text_encoder_3, tokenizer_3); "
            "set diffusion.use_t5=false diffusion.t5_tokens=0"
        )

    def _structure(self) -> SimpleNamespace:
        """The transformer (on the meta device before loading: no weights read), the VAE config and the tokenizers,
        so that settings are checked before any weights load. ``LookupError`` when the configs need a download."""
        if self.loaded:
            return SimpleNamespace(
                transformer=self.transformer,
                vae=self.vae.config,
                tokenizer=self.tokenizers[0],
                tokenizer_3=self.tokenizer_3 if self.text_encoder_3 is not None else None,
            )
        if self._meta is None:
            from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
            from transformers import AutoTokenizer

            source, _ = pipeline_folder_or_hub_id(self.pretrained, EXAMPLE_HUB_ID)
            try:
                index = StableDiffusion3Pipeline.load_config(source, local_files_only=True)
                config = SD3Transformer2DModel.load_config(source, subfolder="transformer", local_files_only=True)
                vae_config = AutoencoderKL.load_config(source, subfolder="vae", local_files_only=True)
                tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=True)
                # whether the model has T5 is the pipeline index's word (a cache filled with use_t5=false lacks
                # T5's folders even for a model that has it: then its tokenizer is read when the model loads)
                if self.use_t5 and "text_encoder_3" in absent_components(index):
                    raise self._no_t5_error()
                tokenizer_3 = (
                    AutoTokenizer.from_pretrained(source, subfolder="tokenizer_3", local_files_only=True) if self.use_t5 else None
                )
            except ConfigError:
                raise
            except (OSError, ValueError) as err:
                raise LookupError(f"{source}: configs not available without downloading ({err})") from err
            with torch.device("meta"):
                transformer = SD3Transformer2DModel.from_config(config)
            self._meta = SimpleNamespace(
                transformer=transformer, vae=SimpleNamespace(**vae_config), tokenizer=tokenizer, tokenizer_3=tokenizer_3
            )
        return self._meta

    def identity(self) -> dict[str, Any]:
        dtype = str(self.dtype).removeprefix("torch.")
        return {"family": self.family, "dtype": dtype, **model_identity(self.pretrained), **lora_identity(self.lora)}

    def modules(self) -> dict[str, torch.nn.Module]:
        self._require_loaded()
        modules = {"vae": self.vae, "transformer": self.transformer, "text_encoder": self.text_encoders[0]}
        modules["text_encoder_2"] = self.text_encoders[1]
        if self.text_encoder_3 is not None:
            modules["text_encoder_3"] = self.text_encoder_3
        return modules

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise RuntimeError(f"backbone {self.name!r} is not loaded: call load() first")

    # -- geometry -------------------------------------------------------------------------------------------------

    def latent_grid(self, resolution: int) -> tuple[int, int]:
        s = self._structure()
        scale = 2 ** (len(s.vae.block_out_channels) - 1)
        patch = s.transformer.config.patch_size
        if resolution % (scale * patch):
            raise ConfigError(f"zero_shot.resolution={resolution} must be a multiple of {scale * patch} for this backbone")
        side = resolution // scale
        limit = s.transformer.config.pos_embed_max_size * patch * scale
        if side // patch > s.transformer.config.pos_embed_max_size:
            raise ConfigError(f"zero_shot.resolution={resolution}: this transformer takes images of at most {limit} pixels")
        return side, side

    def sites(self, resolution: int) -> list[AttentionSite]:
        return mmdit_sites(self._structure().transformer, self.latent_grid(resolution))

    def check_prompt(self, class_names: Sequence[str], template: str, joiner: str) -> None:
        s = self._structure()
        if self.conditioning == "joined":
            map_class_tokens(s.tokenizer, class_names, template, joiner)
            if s.tokenizer_3 is not None:
                map_class_tokens(s.tokenizer_3, class_names, template, joiner, max_length=self.t5_tokens)
            return
        for name in class_names:
            map_class_tokens(s.tokenizer, [name], template, joiner)
            if s.tokenizer_3 is not None:
                map_class_tokens(s.tokenizer_3, [name], template, joiner, max_length=self.t5_tokens)
        limit = s.tokenizer.model_max_length - 1
        if s.tokenizer_3 is not None:
            limit = min(limit, self.t5_tokens)
        if len(class_names) > limit:
            raise PromptTooLongError(
                f"{len(class_names)} class vectors do not fit the text sequence ({limit} positions): "
                "name fewer classes per image or set zero_shot.max_classes_per_prompt"
            )

    # -- text -----------------------------------------------------------------------------------------------------

    def _clip_padded(self, index: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states (B, L, D), pooled projection (B, P)) as the SD3 pipeline computes them."""
        tok, enc = self.tokenizers[index], self.text_encoders[index]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        out = enc(ids.input_ids.to(enc.device), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def _t5_padded(self, prompts: list[str]) -> torch.Tensor:
        tok, enc = self.tokenizer_3, self.text_encoder_3
        ids = tok(prompts, padding="max_length", max_length=self.t5_tokens, truncation=True, return_tensors="pt")
        return enc(ids.input_ids.to(enc.device))[0]

    def _clip_packed(self, index: int, token_lists: list[list[int]]) -> list[list[torch.Tensor]]:
        """Per prompt: (penultimate hidden states, last hidden states), all prompts in one hopping-mask pass."""
        tok, enc = self.tokenizers[index], self.text_encoders[index]

        def run(ids, positions, mask):
            out = enc(ids, attention_mask=additive_mask(mask, enc.dtype), position_ids=positions, output_hidden_states=True)
            return out.hidden_states[-2], out.last_hidden_state

        return encode_packed(run, token_lists, tok.model_max_length, tok.pad_token_id, True, enc.device)

    def _t5_packed(self, token_lists: list[list[int]]) -> list[torch.Tensor]:
        enc = self.text_encoder_3

        def run(ids, positions, mask):
            return (enc(ids, attention_mask=additive_mask(mask, enc.dtype))[0],)  # relative positions: unchanged

        length = max(self.t5_tokens, max(len(t) for t in token_lists))
        return [o[0] for o in encode_packed(run, token_lists, length, self.tokenizer_3.pad_token_id, False, enc.device)]

    def _joint_width(self) -> int:
        return self.transformer.config.joint_attention_dim

    def _t5_zeros(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(batch, self.t5_tokens, self._joint_width())

    def encode_text(self, class_names: Sequence[Sequence[str]], template: str, joiner: str) -> TextConditioning:
        self._require_loaded()
        if self.conditioning == "joined":
            return self._encode_joined(class_names, template, joiner)
        return self._encode_per_class(class_names, template, joiner)

    def _class_weights(self, positions: list[list[list[int]]], t5_positions: list[list[list[int]]] | None, length: int):
        """(B, length, K): each class's CLIP token columns (and T5 ones, each half) averaged; (B, K) validity."""
        k = max(len(p) for p in positions)
        weights = torch.zeros(len(positions), length, k)
        valid = torch.zeros(len(positions), k, dtype=torch.bool)
        share = 1.0 if t5_positions is None else 0.5
        clip_length = self.tokenizers[0].model_max_length
        for b, image in enumerate(positions):
            for c, pos in enumerate(image):
                weights[b, pos, c] += share / len(pos)
                if t5_positions is not None:
                    t5 = [clip_length + p for p in t5_positions[b][c]]
                    weights[b, t5, c] += share / len(t5)
            valid[b, : len(image)] = True
        return weights, valid

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (B, L + t5_tokens, W), pooled (B, P)) exactly as ``StableDiffusion3Pipeline.encode_prompt``
        (no classifier-free guidance); differentiable, for training the miniature model."""
        (h1, p1), (h2, p2) = self._clip_padded(0, prompts), self._clip_padded(1, prompts)
        clip = torch.cat([h1, h2], dim=-1)
        clip = F.pad(clip, (0, self._joint_width() - clip.shape[-1]))
        t5 = self._t5_padded(prompts) if self.text_encoder_3 is not None else self._t5_zeros(len(prompts), clip)
        return torch.cat([clip, t5.to(clip.device, clip.dtype)], dim=1), torch.cat([p1, p2.to(p1.device)], dim=-1)

    def _encode_joined(self, class_names, template, joiner) -> TextConditioning:
        embeddings, pooled = self.encode_prompts([build_prompt(names, template, joiner) for names in class_names])
        mapped = [map_class_tokens(self.tokenizers[0], names, template, joiner) for names in class_names]
        t5_positions = None
        if self.text_encoder_3 is not None:
            t5_positions = [
                map_class_tokens(self.tokenizer_3, names, template, joiner, max_length=self.t5_tokens).positions
                for names in class_names
            ]
        weights, valid = self._class_weights([m.positions for m in mapped], t5_positions, embeddings.shape[1])
        device = embeddings.device
        return TextConditioning((embeddings, pooled), weights.to(device), valid.to(device))

    def _encode_per_class(self, class_names, template, joiner) -> TextConditioning:
        for names in class_names:
            self.check_prompt(names, template, joiner)  # a clear PromptTooLongError, not an index error
        unique = list(dict.fromkeys(name for names in class_names for name in names))
        batch = len(class_names)
        hidden, pooled = [], []
        for index, tok in enumerate(self.tokenizers):
            per_class = [map_class_tokens(tok, [name], template, joiner) for name in unique]
            joined = [tok(build_prompt(names, template, joiner), truncation=False).input_ids for names in class_names]
            length = tok.model_max_length
            joined = [ids if len(ids) <= length else [*ids[: length - 1], tok.eos_token_id] for ids in joined]
            outs = self._clip_packed(index, [m.input_ids for m in per_class] + joined)
            vectors = {name: outs[i][0][m.positions[0]].sum(0) for i, (name, m) in enumerate(zip(unique, per_class, strict=True))}
            enc = self.text_encoders[index]
            pooled.append(enc.text_projection(torch.stack([o[1][-1] for o in outs[len(unique) :]])))
            base, _ = self._clip_padded(index, [""])  # BOS and the padding embeddings
            seq = base.expand(batch, -1, -1).clone()
            for b, names in enumerate(class_names):
                for c, name in enumerate(names):
                    seq[b, 1 + c] = vectors[name]
            hidden.append(seq)
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, self._joint_width() - clip.shape[-1]))
        positions = [[[1 + c] for c in range(len(names))] for names in class_names]
        t5_positions = None
        if self.text_encoder_3 is not None:
            mapped = [map_class_tokens(self.tokenizer_3, [n], template, joiner, max_length=self.t5_tokens) for n in unique]
            outs = self._t5_packed([m.input_ids for m in mapped])
            vectors = {name: outs[i][m.positions[0]].sum(0) for i, (name, m) in enumerate(zip(unique, mapped, strict=True))}
            t5 = self._t5_padded([""]).expand(batch, -1, -1).clone()
            for b, names in enumerate(class_names):
                for c, name in enumerate(names):
                    t5[b, c] = vectors[name]
            t5_positions = [[[c] for c in range(len(names))] for names in class_names]
        else:
            t5 = self._t5_zeros(batch, clip)
        embeddings = torch.cat([clip, t5.to(clip.device, clip.dtype)], dim=1)
        weights, valid = self._class_weights(positions, t5_positions, embeddings.shape[1])
        device = embeddings.device
        return TextConditioning((embeddings, torch.cat(pooled, dim=-1)), weights.to(device), valid.to(device))

    # -- images, time, forward --------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return vae_latents(self.vae, pixels)

    def noise_schedule(self):
        """A copy of the model's scheduler with ``num_inference_steps`` set as the SD3 pipeline sets them (the
        pipeline's own scheduler, which a training loop may be using, is left alone)."""
        key = (id(self.scheduler), self.num_inference_steps)
        if self._schedule is None or self._schedule[0] != key:
            schedule = type(self.scheduler).from_config(self.scheduler.config)
            schedule.set_timesteps(self.num_inference_steps)
            self._schedule = (key, schedule)
        return self._schedule[1]

    def noise(self, latents: torch.Tensor, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        b = latents.shape[0]
        if not self.add_noise:
            return latents, torch.full((b,), self.timestep, device=latents.device, dtype=torch.float32)
        schedule = self.noise_schedule()
        t = schedule.timesteps[self.noise_step - 1].to(latents.device).expand(b)
        noise = draw_noise(latents, generator)
        return schedule.scale_noise(latents, t, noise), t

    # -- training (MAGNET) -----------------------------------------------------------------------------------------

    @property
    def denoiser(self) -> torch.nn.Module | None:
        """The transformer (None before :meth:`load`)."""
        return self.transformer

    def training_schedule(self):
        """A copy of the model's scheduler as it was trained (``num_train_timesteps`` steps, the model's shift)."""
        key = ("train", id(self.scheduler))
        if self._train_schedule is None or self._train_schedule[0] != key:
            self._train_schedule = (key, type(self.scheduler).from_config(self.scheduler.config))
        return self._train_schedule[1]

    def training_sample(
        self,
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ) -> TrainingSample:
        """Flow matching as diffusers' ``train_dreambooth_lora_sd3.py`` draws it: times from
        ``compute_density_for_timestep_sampling``, ``x_t = (1 - s) x0 + s eps``, target ``eps - x0``, weights from
        ``compute_loss_weighting_for_sd3``. With a (CPU) ``generator`` the draw does not depend on the device."""
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        schedule = self.training_schedule()
        b, n = latents.shape[0], schedule.config.num_train_timesteps
        u = compute_density_for_timestep_sampling(weighting_scheme, b, logit_mean, logit_std, mode_scale, generator=generator)
        index = (u * n).long().clamp(max=n - 1)
        time = schedule.timesteps[index].to(latents.device)
        sigmas = schedule.sigmas[index].to(latents.device, torch.float32).view(-1, *[1] * (latents.ndim - 1))
        device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype).to(latents.device)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        weighting = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)
        return TrainingSample(noisy=noisy.to(latents.dtype), time=time, target=noise - latents, weighting=weighting)

    # -- sampling (EmerDiff) ---------------------------------------------------------------------------------------

    def sequence_length(self, latents: torch.Tensor) -> int:
        patch = self.transformer.config.patch_size
        return (latents.shape[-2] // patch) * (latents.shape[-1] // patch)  # (B, C, H, W) in patches

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_pixels(self.vae, latents)

    def install_modulation(self, state: ModulationState, site: str) -> None:
        self._require_loaded()
        self._processors.install_all(
            self.transformer,
            mmdit_sites(self.transformer, (0, 0)),
            lambda s: ModulatedJointAttentionProcessor(state, s.id, modulated=s.id == site, layout=IMAGE_FIRST),
            named=site,
            what="emerdiff.site",
        )

    def encode_captions(self, prompts: Sequence[str]) -> TextConditioning:
        embeddings, pooled = self.encode_prompts(list(prompts))
        b, length = embeddings.shape[:2]
        no_classes = embeddings.new_zeros(b, length, 0)
        return TextConditioning((embeddings, pooled), no_classes, torch.zeros(b, 0, dtype=torch.bool, device=embeddings.device))

    def save_lora(self, folder: str | Path, lora_state: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(
            str(folder), transformer_lora_layers=lora_state, transformer_lora_adapter_metadata=metadata
        )
        return Path(folder) / LORA_FILE

    def denoise(self, latents: torch.Tensor, time: torch.Tensor, text: TextConditioning) -> torch.Tensor:
        tr = self.transformer
        embeddings, pooled = text.embeddings
        return tr(
            hidden_states=latents.to(tr.dtype),
            encoder_hidden_states=embeddings.to(tr.dtype),
            pooled_projections=pooled.to(tr.dtype),
            timestep=time,
        ).sample

    # -- capture ------------------------------------------------------------------------------------------------------

    def install_capture(self, request: CaptureRequest, store: AttentionStore) -> None:
        self._require_loaded()
        sites = mmdit_sites(self.transformer, (0, 0))  # kinds only: the grids do not matter for installing
        carry = self._concept_path(sites, request, store)
        self._processors.install_capture(self.transformer, sites, request, store, self._capture_processor, carry)

    def _capture_processor(
        self, site: AttentionSite, wants: SiteCapture, store: AttentionStore
    ) -> JointAttentionMapProcessor | SelfAttentionQKProcessor:
        if site.kind == "joint":
            return JointAttentionMapProcessor(
                store, site.id, wants.class_maps, wants.query_keys, wants.text_logits, self.attention_maps,
                wants.head_maps, layout=IMAGE_FIRST, concepts=self._concepts,
            )  # fmt: skip
        return SelfAttentionQKProcessor(store, site.id)  # image-only (SD3.5's attn2): Q/K is all it gives

    def remove_capture(self) -> None:
        self._require_loaded()
        self._processors.remove(self.transformer)
        self._remove_concepts()
