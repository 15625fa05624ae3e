"""The FLUX.1 family (dev, schnell): VAE with shift, packed 2x2 latents, ``FluxTransformer2DModel``, CLIP-L (pooled), T5.

One implementation of :class:`~stableseg_pp.backbones.base.DiffusionBackbone`.
The transformer runs ``num_layers`` double-stream blocks (``FluxTransformerBlock``:
separate image and text weights, one joint attention) and then
``num_single_layers`` single-stream blocks (``FluxSingleTransformerBlock``: text
and image concatenated into one sequence, one set of weights). Every one of them
attends over the joint sequence ``[text; image]`` (text first, the opposite of
SD3), so each is a ``joint`` site: class maps (image-to-text probabilities
normalised over all joint keys) and image Q/K for SAR. Sites, in forward order:
``transformer_blocks.<i>.attn`` (depth i), then ``single_transformer_blocks.<j>.attn``
(depth ``num_layers + j``); kinds and depths come from the block classes and
their order, the ids are the modules' paths (what ``set_attn_processor`` keys).
:class:`~stableseg_pp.backbones.base.AttentionSite` has no kind for "single
stream": both are ``joint``, and this module tells them apart by depth.

RoPE (``image_rotary_emb``) is applied to the joint Q and K in every block; the
text ids are zeros, so it leaves text tokens unchanged. The capture processors
compute exactly what ``FluxAttnProcessor`` computes (projections, RMS norms,
RoPE on the joint Q/K, the output projections; single blocks are ``pre_only``)
and read the class maps from the same fused attention call
(:func:`~stableseg_pp.backbones.joint_capture.joint_attention_maps`, ``TEXT_FIRST``);
the image Q/K kept for SAR are those after RoPE, as the model compares them.

The text length of single-stream blocks: their processor receives ``[text;
image]`` concatenated with ``encoder_hidden_states=None``. While capture
processors are installed, a forward pre-hook on every single-stream block reads
the length of the ``encoder_hidden_states`` that block is called with and puts it
in a :class:`TextLength` that the single-stream processors share; the hook is
removed with the processors. Not ``joint_attention_kwargs``: ``FluxAttention``
warns about every keyword its processor does not take, so the stock processors
of the other blocks would warn on each forward (and a caller of the transformer
would have to pass it); not a field set by :meth:`FluxBackbone.denoise` alone:
the hook holds for any call of the transformer or of one block, and the length
comes from the very call whose attention runs.

Two text-conditioning schemes (the text tokens are T5's; CLIP gives only the pooled vector):

* ``per_class``: each class prompt ``template % name`` through T5, all class
  prompts in one pass with the hopping mask (:mod:`.hopping`), the name's tokens
  summed into one vector placed at positions 0..k-1 of the T5 sequence, the
  empty prompt's embeddings elsewhere; the pooled CLIP vector of the joined prompt.
* ``joined``: the class names joined in one prompt, encoded exactly as
  ``FluxPipeline.encode_prompt``; a class map is the mean over its T5 tokens.

Latents are packed 2x2 into tokens as ``FluxPipeline`` packs them (:func:`pack_latents`):
:meth:`FluxBackbone.encode_images` returns (B, N, 4C) tokens of a square grid.
Time is in the training schedule's units, 0..1000 (``sigma * 1000``), as for SD3
(``noise``, ``time_input``, ``noise_to``); :meth:`FluxBackbone.denoise` passes
``time / 1000`` to the transformer, as the pipeline does. Noise: flow matching
at step ``noise_step`` of ``num_inference_steps`` on the model's own schedule,
shifted for the image's token count (``calculate_shift``) when the scheduler
uses dynamic shifting (FLUX.1-dev), with a fixed shift otherwise (schnell).
FLUX.1-dev embeds a guidance value (``guidance``, 3.5 in the pipeline); schnell has none.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)

from stableseg_pp.backbones.base import (
    AttentionSite,
    AttentionStore,
    CaptureRequest,
    Generators,
    ModulationState,
    TextConditioning,
    draw_noise,
    vae_latents,
    vae_pixels,
)
from stableseg_pp.backbones.flow_matching import (
    FlowMatchingNoise,
    FlowMatchingSampler,
    TransformerSettings,
    size_shift,
    whole_number,
)
from stableseg_pp.backbones.hopping import additive_mask, encode_packed
from stableseg_pp.backbones.installer import ProcessorInstaller, SiteCapture
from stableseg_pp.backbones.joint_capture import TEXT_FIRST, JointAttentionMapProcessor
from stableseg_pp.backbones.loading import (
    apply_lora,
    lora_identity,
    model_identity,
    offline_hint,
    pipeline_folder_or_hub_id,
)
from stableseg_pp.backbones.prompts import PromptTooLongError, build_prompt, map_class_tokens
from stableseg_pp.backbones.sd3_mmdit import absent_components
from stableseg_pp.runtime.errors import ConfigError, one_line

EXAMPLE_HUB_ID = "black-forest-labs/FLUX.1-dev"
PACK = 2  # FLUX packs 2x2 latent pixels into one token


# -- geometry ---------------------------------------------------------------------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens, as ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, 4C) tokens of a token ``grid`` (h/2, w/2) -> (B, C, h, w) latents, as ``FluxPipeline._unpack_latents``."""
    b, n, channels = tokens.shape
    gh, gw = grid
    if gh * gw != n:
        raise ValueError(f"{n} tokens are not a {gh}x{gw} grid")
    x = tokens.view(b, gh, gw, channels // (PACK * PACK), PACK, PACK).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // (PACK * PACK), gh * PACK, gw * PACK)


def token_grid(n_tokens: int) -> tuple[int, int]:
    """The square token grid of ``n_tokens`` packed latent tokens (images are square: :meth:`FluxBackbone.latent_grid`)."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ValueError(f"{n_tokens} latent tokens are not a square grid: FLUX latents here come from square images")
    return side, side


def image_ids(grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h*w, 3) RoPE position ids of the image tokens, as ``FluxPipeline._prepare_latent_image_ids``."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, grid[0], grid[1], device, dtype)


def flux_sites(transformer, latent_hw: tuple[int, int]) -> list[AttentionSite]:
    """Every attention site of a ``FluxTransformer2DModel``, in forward order: each double-stream block's joint
    attention (depth i), then each single-stream block's (depth ``num_layers + j``). Kinds and depths come from the
    blocks' classes and order; ids are the attention modules' paths."""
    grid = (latent_hw[0] // PACK, latent_hw[1] // PACK)
    paths = {id(module): name for name, module in transformer.named_modules()}
    streams = (
        (transformer.transformer_blocks, FluxTransformerBlock),
        (transformer.single_transformer_blocks, FluxSingleTransformerBlock),
    )
    sites = []
    for stream, kind in streams:
        for block in stream:
            if not isinstance(block, kind):
                raise TypeError(f"{type(block).__name__} in a FLUX transformer where a {kind.__name__} is expected")
            sites.append(AttentionSite(paths[id(block.attn)], "joint", grid, len(sites), block.attn.heads))
    return sites


# -- capture ----------------------------------------------------------------------------------------------------------


@dataclass
class TextLength:
    """The number of text tokens of the block being run (set by a pre-hook on each single-stream block)."""

    value: int | None = None

    def hook(self, block, args, kwargs) -> None:
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        self.value = text.shape[1]


def _heads(x: torch.Tensor, attn) -> torch.Tensor:
    """(B, L, heads * d) -> (B, L, heads, d), as ``FluxAttnProcessor`` splits them."""
    return x.unflatten(-1, (-1, attn.head_dim))


def _rope(x: torch.Tensor, image_rotary_emb) -> torch.Tensor:
    """RoPE on (B, L, heads, d) joint Q or K -> (B, heads, L, d)."""
    if image_rotary_emb is not None:
        x = apply_rotary_emb(x, image_rotary_emb, sequence_dim=1)
    return x.transpose(1, 2)


def double_stream_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """Joint Q, K (after RoPE) and V (B, heads, T + N, d) of a double-stream block in ``[text; image]`` order, exactly
    as ``FluxAttnProcessor`` computes them."""
    q = attn.norm_q(_heads(attn.to_q(hidden_states), attn))
    k = attn.norm_k(_heads(attn.to_k(hidden_states), attn))
    v = _heads(attn.to_v(hidden_states), attn)
    cq = attn.norm_added_q(_heads(attn.add_q_proj(encoder_hidden_states), attn))
    ck = attn.norm_added_k(_heads(attn.add_k_proj(encoder_hidden_states), attn))
    cv = _heads(attn.add_v_proj(encoder_hidden_states), attn)
    q, k = _rope(torch.cat([cq, q], dim=1), image_rotary_emb), _rope(torch.cat([ck, k], dim=1), image_rotary_emb)
    return q, k, torch.cat([cv, v], dim=1).transpose(1, 2)


def double_stream_outputs(attn, out: torch.Tensor, n_text: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, heads, T + N, d) joint output -> (image, text) projected, as ``FluxAttnProcessor`` returns them."""
    out = out.transpose(1, 2).flatten(2, 3)
    text, image = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
    return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())


def single_stream_qkv(attn, hidden_states, image_rotary_emb):
    """Q, K (after RoPE) and V (B, heads, T + N, d) of a single-stream block, as ``FluxAttnProcessor`` computes them."""
    q = _rope(attn.norm_q(_heads(attn.to_q(hidden_states), attn)), image_rotary_emb)
    k = _rope(attn.norm_k(_heads(attn.to_k(hidden_states), attn)), image_rotary_emb)
    return q, k, _heads(attn.to_v(hidden_states), attn).transpose(1, 2)


def known_text_length(name: str, text_length: TextLength, total: int) -> int:
    n_text = text_length.value
    if n_text is None or not 0 < n_text < total:
        raise RuntimeError(
            f"{name}: the text length of this single-stream block is unknown ({n_text}); the FLUX backbone's "
            "install_capture / install_modulation set it from each single-stream block's call"
        )
    return n_text


class _FluxCapture(JointAttentionMapProcessor):
    """What both FLUX capture processors record: :class:`JointAttentionMapProcessor`'s, on ``[text; image]``."""

    def __init__(self, store: AttentionStore, name: str, **wants):
        super().__init__(store, name, layout=TEXT_FIRST, **wants)

    def _check(self, attn, attention_mask) -> None:
        if attention_mask is not None:
            raise ValueError(f"{self.name}: the FLUX capture processors take no attention mask (the pipeline passes none)")
        if getattr(attn, "fused_projections", False):
            raise ValueError(f"{self.name}: fused QKV projections are not supported by the capture processors")

    def attend_joint(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_text: int) -> torch.Tensor:
        """Joint attention of (B, heads, T + N, d) Q, K (after RoPE) and V in ``[text; image]`` order, recording what
        was asked; the output (B, heads, T + N, d) in the same order."""
        text = (q[:, :, :n_text], k[:, :, :n_text], v[:, :, :n_text])
        image = (q[:, :, n_text:], k[:, :, n_text:], v[:, :, n_text:])
        return self.attend(image, text, attn.head_dim**-0.5)


class FluxJointCaptureProcessor(_FluxCapture):
    """``FluxAttnProcessor`` of a double-stream block that also records, for that block, what StableSeg and MAGNET
    read: class maps (``store.cross``, per head in ``store.cross_heads``), image Q/K after RoPE (``store.self_qk``),
    pre-softmax image-to-text logits (``store.text_logits``). Returns (image output, text output) as the stock one."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None:
            raise ValueError(f"{self.name}: FluxJointCaptureProcessor installed on a single-stream attention")
        self._check(attn, attention_mask)
        q, k, v = double_stream_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        n_text = encoder_hidden_states.shape[1]
        return double_stream_outputs(attn, self.attend_joint(attn, q, k, v, n_text).to(q.dtype), n_text)


class FluxSingleCaptureProcessor(_FluxCapture):
    """``FluxAttnProcessor`` of a single-stream block (``pre_only``: no output projection) that records as
    :class:`FluxJointCaptureProcessor` does. ``text_length``: where the text ends in the joint sequence it receives."""

    def __init__(self, store: AttentionStore, name: str, text_length: TextLength, **wants):
        super().__init__(store, name, **wants)
        self.text_length = text_length

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is not None:
            raise ValueError(f"{self.name}: FluxSingleCaptureProcessor installed on a double-stream attention")
        self._check(attn, attention_mask)
        n_text = known_text_length(self.name, self.text_length, hidden_states.shape[1])
        q, k, v = single_stream_qkv(attn, hidden_states, image_rotary_emb)
        return self.attend_joint(attn, q, k, v, n_text).transpose(1, 2).flatten(2, 3).to(q.dtype)


class FluxModulatedProcessor:
    """EmerDiff's injection (and, on a double-stream block, its modulation) on a FLUX attention; a diffusers processor.

    Every run attends with its reference run's Q and K (after RoPE) over the whole ``[text; image]`` sequence, so its
    probabilities are the reference's while its values are its own; on the modulated double-stream block
    ``offset[b, n]`` is added to every channel of the image stream's projected output (the text stream untouched).

    Args:
        state: the shared :class:`ModulationState`.
        name: the block's site id.
        modulated: whether this block's image output is modulated (double-stream blocks only).
        text_length: where the text ends in a single-stream block's sequence (None on double-stream blocks).
    """

    def __init__(self, state: ModulationState, name: str, modulated: bool = False, text_length: TextLength | None = None):
        if modulated and text_length is not None:
            raise ConfigError(
                f"emerdiff.site={name}: a single-stream block has no image output of its own to modulate; choose a "
                "double-stream block, transformer_blocks.<i>.attn"
            )
        self.state = state
        self.name = name
        self.modulated = modulated
        self.text_length = text_length

    def _attend(self, q, k, v) -> torch.Tensor:
        reference = self.state.reference
        if reference is not None:
            reference = reference.to(q.device)
            q, k = q[reference], k[reference]
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if self.text_length is not None:  # single-stream: [text; image] in, attention output out (no projection)
            known_text_length(self.name, self.text_length, hidden_states.shape[1])
            q, k, v = single_stream_qkv(attn, hidden_states, image_rotary_emb)
            return self._attend(q, k, v).transpose(1, 2).flatten(2, 3).to(q.dtype)
        q, k, v = double_stream_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        n_text = encoder_hidden_states.shape[1]
        image, text = double_stream_outputs(attn, self._attend(q, k, v).to(q.dtype), n_text)
        offset = self.state.offset if self.modulated else None
        if offset is not None:
            if offset.shape[1] != image.shape[1]:
                raise ValueError(f"{self.name}: modulation offset has {offset.shape[1]} tokens, the block {image.shape[1]}")
            image = image + offset.to(image.dtype)[:, :, None]
        return image, text


# -- the backbone -------------------------------------------------------------------------------------------------------


class FluxBackbone(TransformerSettings, FlowMatchingNoise, FlowMatchingSampler):
    """FLUX.1 (dev, schnell) behind the backbone interface.

    Args:
        name: the preset's name (``diffusion.name``).
        pretrained: a local diffusers folder or a hub id (e.g. ``black-forest-labs/FLUX.1-dev``).
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        t5_tokens: T5's sequence length (the pipeline's ``max_sequence_length``: 512 for dev, 256 for schnell).
        conditioning: ``per_class`` (class vectors) or ``joined`` (one prompt).
        attention_maps: ``both`` (image-to-text averaged with transposed text-to-image), ``image_to_text`` or
            ``output_space`` (ConceptAttention's scores).
        timestep: what the transformer is told for a clean latent (0..1000 scale; 1 = almost clean).
        add_noise: flow-matching noise at step ``noise_step`` of ``num_inference_steps`` instead.
        guidance: the embedded guidance value of a guidance-distilled model (dev); ignored by a model without one.
        lora: a diffusers-format LoRA of the transformer, loaded with the pipeline's ``load_lora_weights`` and fused;
            its fingerprint is part of :meth:`identity`.
    """

    family = "flux"

    def __init__(
        self,
        name: str = "flux",
        pretrained: str = EXAMPLE_HUB_ID,
        dtype: str = "bfloat16",
        t5_tokens: int = 512,
        conditioning: str = "per_class",
        attention_maps: str = "both",
        timestep: float = 1.0,
        add_noise: bool = False,
        num_inference_steps: int = 28,
        noise_step: int = 8,
        guidance: float = 3.5,
        lora: str | None = None,
    ):
        if not 1 <= whole_number("t5_tokens", t5_tokens, 1) <= 512:
            raise ConfigError(f"diffusion.t5_tokens={t5_tokens}: give T5's sequence length, 1 to 512 (dev: 512, schnell: 256)")
        if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not 0 <= guidance < math.inf:
            raise ConfigError(f"diffusion.guidance={guidance}: give the embedded guidance value, a number >= 0 (dev: 3.5)")
        self._set_settings(name, pretrained, dtype, t5_tokens, conditioning, attention_maps, timestep, add_noise,
                           num_inference_steps, noise_step, lora)  # fmt: skip
        self.guidance = float(guidance)
        self.vae = self.transformer = self.scheduler = None
        self.text_encoder = self.tokenizer = None  # CLIP-L: the pooled vector
        self.text_encoder_2 = self.tokenizer_2 = None  # T5: the text tokens
        self._processors = ProcessorInstaller(FluxAttnProcessor, "this transformer")
        self._text_length = TextLength()
        self._hooks: list = []
        self._meta: SimpleNamespace | None = None
        self._schedules: dict[tuple, Any] = {}

    @classmethod
    def from_pipeline(cls, pipe, **kwargs) -> FluxBackbone:
        """A backbone from a ``FluxPipeline`` already built (tests)."""
        backbone = cls(**kwargs)
        backbone._set_components(pipe)
        return backbone

    def _set_components(self, pipe) -> None:
        self.vae, self.transformer, self.scheduler = pipe.vae, pipe.transformer, pipe.scheduler
        self.text_encoder, self.tokenizer = pipe.text_encoder, pipe.tokenizer
        self.text_encoder_2, self.tokenizer_2 = pipe.text_encoder_2, pipe.tokenizer_2
        self._meta = None
        self._schedules.clear()

    @property
    def loaded(self) -> bool:
        return self.transformer is not None

    def load(self) -> FluxBackbone:
        if self.loaded:
            return self
        from diffusers import FluxPipeline

        source, is_local = pipeline_folder_or_hub_id(self.pretrained, EXAMPLE_HUB_ID)
        local_only = is_local or os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
                index = FluxPipeline.load_config(source, local_files_only=local_only)
                absent = dict.fromkeys(absent_components(index))  # e.g. image_encoder, feature_extractor
                pipe = FluxPipeline.from_pretrained(source, torch_dtype=self.dtype, local_files_only=local_only, **absent)
        except (OSError, ValueError) as err:
            raise ConfigError(offline_hint(self.pretrained, one_line(err))) from err
        if self.lora:
            apply_lora(pipe, self.lora)
        self._set_components(pipe)
        for module in self.modules().values():
            module.eval().requires_grad_(False)
        return self

    def _structure(self) -> SimpleNamespace:
        """The transformer (on the meta device before loading: no weights read), the VAE config and the T5
        tokenizer, so that settings are checked before any weights load. ``LookupError`` when the configs need a
        download."""
        if self.loaded:
            return SimpleNamespace(transformer=self.transformer, vae=self.vae.config, tokenizer_2=self.tokenizer_2)
        if self._meta is None:
            from diffusers import AutoencoderKL, FluxTransformer2DModel
            from transformers import AutoTokenizer

            source, _ = pipeline_folder_or_hub_id(self.pretrained, EXAMPLE_HUB_ID)
            try:
                config = FluxTransformer2DModel.load_config(source, subfolder="transformer", local_files_only=True)
                vae_config = AutoencoderKL.load_config(source, subfolder="vae", local_files_only=True)
                tokenizer_2 = AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2", local_files_only=True)
            except (OSError, ValueError) as err:
                raise LookupError(f"{source}: configs not available without downloading ({err})") from err
            with torch.device("meta"):
                transformer = FluxTransformer2DModel.from_config(config)
            self._meta = SimpleNamespace(transformer=transformer, vae=SimpleNamespace(**vae_config), tokenizer_2=tokenizer_2)
        return self._meta

    def identity(self) -> dict[str, Any]:
        dtype = str(self.dtype).removeprefix("torch.")
        return {"family": self.family, "dtype": dtype, **model_identity(self.pretrained), **lora_identity(self.lora)}

    def modules(self) -> dict[str, torch.nn.Module]:
        self._require_loaded()
        return {
            "vae": self.vae,
            "transformer": self.transformer,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise RuntimeError(f"backbone {self.name!r} is not loaded: call load() first")

    # -- geometry -------------------------------------------------------------------------------------------------

    def latent_grid(self, resolution: int) -> tuple[int, int]:
        """(h, w) of the unpacked latent; the transformer sees (h/2) x (w/2) tokens."""
        scale = 2 ** (len(self._structure().vae.block_out_channels) - 1)
        if resolution % (scale * PACK):
            raise ConfigError(f"zero_shot.resolution={resolution} must be a multiple of {scale * PACK} for this backbone")
        side = resolution // scale
        return side, side

    def sites(self, resolution: int) -> list[AttentionSite]:
        return flux_sites(self._structure().transformer, self.latent_grid(resolution))

    def _is_single(self, site: AttentionSite) -> bool:
        """Single-stream sites follow the double-stream ones in the forward (:func:`flux_sites`)."""
        return site.depth >= len(self._structure().transformer.transformer_blocks)

    def check_prompt(self, class_names: Sequence[str], template: str, joiner: str) -> None:
        tokenizer = self._structure().tokenizer_2
        if self.conditioning == "joined":
            map_class_tokens(tokenizer, class_names, template, joiner, max_length=self.t5_tokens)
            return
        for name in class_names:
            map_class_tokens(tokenizer, [name], template, joiner, max_length=self.t5_tokens)
        if len(class_names) > self.t5_tokens:
            raise PromptTooLongError(
                f"{len(class_names)} class vectors do not fit the text sequence ({self.t5_tokens} positions): "
                "name fewer classes per image or set zero_shot.max_classes_per_prompt"
            )

    # -- text -----------------------------------------------------------------------------------------------------

    def _clip_pooled(self, prompts: list[str]) -> torch.Tensor:
        """(B, P) pooled CLIP vectors as ``FluxPipeline._get_clip_prompt_embeds`` computes them (truncated to CLIP's length)."""
        tok, enc = self.tokenizer, self.text_encoder
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return enc(ids.input_ids.to(enc.device), output_hidden_states=False).pooler_output

    def _t5_padded(self, prompts: list[str]) -> torch.Tensor:
        """(B, t5_tokens, W) as ``FluxPipeline._get_t5_prompt_embeds`` computes them (no attention mask)."""
        tok, enc = self.tokenizer_2, self.text_encoder_2
        ids = tok(prompts, padding="max_length", max_length=self.t5_tokens, truncation=True, return_tensors="pt")
        return enc(ids.input_ids.to(enc.device), output_hidden_states=False)[0]

    def _t5_packed(self, token_lists: list[list[int]]) -> list[torch.Tensor]:
        """Per prompt, its T5 hidden states (n_tokens, W), all prompts in one hopping-mask pass."""
        enc = self.text_encoder_2

        def run(ids, positions, mask):
            return (enc(ids, attention_mask=additive_mask(mask, enc.dtype))[0],)  # relative positions: unchanged

        length = max(self.t5_tokens, max(len(t) for t in token_lists))
        return [o[0] for o in encode_packed(run, token_lists, length, self.tokenizer_2.pad_token_id, False, enc.device)]

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 embeddings (B, t5_tokens, W), pooled CLIP (B, P)) exactly as ``FluxPipeline.encode_prompt``."""
        pooled = self._clip_pooled(prompts)
        return self._t5_padded(prompts).to(pooled.device), pooled

    def encode_text(self, class_names: Sequence[Sequence[str]], template: str, joiner: str) -> TextConditioning:
        self._require_loaded()
        for names in class_names:
            self.check_prompt(names, template, joiner)  # a clear PromptTooLongError, not an index error
        if self.conditioning == "joined":
            return self._encode_joined(class_names, template, joiner)
        return self._encode_per_class(class_names, template, joiner)

    @staticmethod
    def _class_weights(positions: list[list[list[int]]], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, length, K): each class's T5 token columns averaged; (B, K) validity."""
        k = max(len(p) for p in positions)
        weights = torch.zeros(len(positions), length, k)
        valid = torch.zeros(len(positions), k, dtype=torch.bool)
        for b, image in enumerate(positions):
            for c, pos in enumerate(image):
                weights[b, pos, c] = 1.0 / len(pos)
            valid[b, : len(image)] = True
        return weights, valid

    def _encode_joined(self, class_names, template, joiner) -> TextConditioning:
        embeddings, pooled = self.encode_prompts([build_prompt(names, template, joiner) for names in class_names])
        positions = [
            map_class_tokens(self.tokenizer_2, names, template, joiner, max_length=self.t5_tokens).positions
            for names in class_names
        ]
        weights, valid = self._class_weights(positions, embeddings.shape[1])
        device = embeddings.device
        return TextConditioning((embeddings, pooled), weights.to(device), valid.to(device))

    def _encode_per_class(self, class_names, template, joiner) -> TextConditioning:
        unique = list(dict.fromkeys(name for names in class_names for name in names))
        mapped = [map_class_tokens(self.tokenizer_2, [n], template, joiner, max_length=self.t5_tokens) for n in unique]
        outs = self._t5_packed([m.input_ids for m in mapped])
        vectors = {name: outs[i][m.positions[0]].sum(0) for i, (name, m) in enumerate(zip(unique, mapped, strict=True))}
        embeddings = self._t5_padded([""]).expand(len(class_names), -1, -1).clone()  # the empty prompt's embeddings
        for b, names in enumerate(class_names):
            for c, name in enumerate(names):
                embeddings[b, c] = vectors[name]
        pooled = self._clip_pooled([build_prompt(names, template, joiner) for names in class_names])
        positions = [[[c] for c in range(len(names))] for names in class_names]
        weights, valid = self._class_weights(positions, embeddings.shape[1])
        device = embeddings.device
        return TextConditioning((embeddings, pooled.to(device)), weights.to(device), valid.to(device))

    def encode_captions(self, prompts: Sequence[str]) -> TextConditioning:
        embeddings, pooled = self.encode_prompts(list(prompts))
        b, length = embeddings.shape[:2]
        no_classes = embeddings.new_zeros(b, length, 0)
        return TextConditioning((embeddings, pooled), no_classes, torch.zeros(b, 0, dtype=torch.bool, device=embeddings.device))

    # -- images, time, forward --------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) pixels -> (B, N, 4C) packed latent tokens (VAE mean, shifted and scaled)."""
        return pack_latents(vae_latents(self.vae, pixels))

    def noise_schedule(self, image_tokens: int):
        """A copy of the model's scheduler with the timesteps ``FluxPipeline`` sets for ``num_inference_steps`` and an
        image of ``image_tokens`` tokens (its sigmas; ``mu`` from ``calculate_shift``, used with dynamic shifting).
        The pipeline's own scheduler is left alone."""
        key = (id(self.scheduler), self.num_inference_steps, int(image_tokens))
        if key not in self._schedules:
            schedule = type(self.scheduler).from_config(self.scheduler.config)
            config, n = schedule.config, self.num_inference_steps
            mu = size_shift(config, image_tokens)
            if config.get("use_flow_sigmas", False):
                schedule.set_timesteps(n, mu=mu)
            else:
                schedule.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
            self._schedules[key] = schedule
        return self._schedules[key]

    def noise(self, latents: torch.Tensor, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        b = latents.shape[0]
        if not self.add_noise:
            return latents, torch.full((b,), self.timestep, device=latents.device, dtype=torch.float32)
        schedule = self.noise_schedule(latents.shape[1])
        t = schedule.timesteps[self.noise_step - 1].to(latents.device).expand(b)
        noise = draw_noise(latents, generator)
        return schedule.scale_noise(latents, t, noise), t

    def denoise(self, latents: torch.Tensor, time: torch.Tensor, text: TextConditioning) -> torch.Tensor:
        """(B, N, 4C) packed latents at ``time`` (0..1000) -> the transformer's (B, N, 4C) prediction, called as
        ``FluxPipeline`` calls it (timestep / 1000, zero text ids, the image ids of the token grid, guidance)."""
        tr = self.transformer
        embeddings, pooled = text.embeddings
        b = latents.shape[0]
        device, dtype = latents.device, tr.dtype
        guidance = None
        if tr.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=device, dtype=torch.float32)
        return tr(
            hidden_states=latents.to(dtype),
            timestep=time.to(device, dtype).expand(b) / 1000,
            guidance=guidance,
            pooled_projections=pooled.to(device, dtype),
            encoder_hidden_states=embeddings.to(device, dtype),
            txt_ids=torch.zeros(embeddings.shape[1], 3, device=device, dtype=dtype),
            img_ids=image_ids(token_grid(latents.shape[1]), device, dtype),
            return_dict=False,
        )[0]

    # -- capture ------------------------------------------------------------------------------------------------------

    def install_capture(self, request: CaptureRequest, store: AttentionStore) -> None:
        self._require_loaded()
        sites = flux_sites(self.transformer, (0, 0))  # kinds and depths only: the grids do not matter for installing
        carry = self._concept_path(sites, request, store)
        self._processors.install_capture(self.transformer, sites, request, store, self._capture_processor, carry)
        self._hook_text_length()

    def _hook_text_length(self) -> None:
        """The single-stream blocks' text length, read from each call by a pre-hook (removed with the processors)."""
        if not self._hooks:
            self._hooks = [
                block.register_forward_pre_hook(self._text_length.hook, with_kwargs=True)
                for block in self.transformer.single_transformer_blocks
            ]

    # -- sampling (EmerDiff) ---------------------------------------------------------------------------------------

    def sequence_length(self, latents: torch.Tensor) -> int:
        return latents.shape[1]  # packed: (B, N, 4C)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, N, 4C) packed latent tokens -> (B, 3, R, R) pixels in [-1, 1]."""
        return vae_pixels(self.vae, unpack_latents(latents, token_grid(latents.shape[1])))

    def install_modulation(self, state: ModulationState, site: str) -> None:
        self._require_loaded()
        self._processors.install_all(
            self.transformer,
            flux_sites(self.transformer, (0, 0)),
            lambda s: FluxModulatedProcessor(state, s.id, s.id == site, self._text_length if self._is_single(s) else None),
            named=site,
            what="emerdiff.site",
        )
        self._hook_text_length()

    def _capture_processor(self, site: AttentionSite, wants: SiteCapture, store: AttentionStore) -> _FluxCapture:
        settings = {
            "class_maps": wants.class_maps, "query_keys": wants.query_keys, "text_logits": wants.text_logits,
            "directions": self.attention_maps, "per_head": wants.head_maps,
            "concepts": self._concepts,
        }  # fmt: skip
        if self._is_single(site):
            return FluxSingleCaptureProcessor(store, site.id, self._text_length, **settings)
        return FluxJointCaptureProcessor(store, site.id, **settings)

    def remove_capture(self) -> None:
        self._require_loaded()
        self._processors.remove(self.transformer)
        self._remove_concepts()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._text_length.value = None
