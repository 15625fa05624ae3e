"""The Stable Diffusion 1.x/2.x U-Net family: VAE, ``UNet2DConditionModel``, CLIP text encoder, DDPM time.

One implementation of :class:`~stableseg_pp.backbones.base.DiffusionBackbone`:
loading (the shipped miniature model, a local diffusers folder, or a hub id),
its attention sites (decided from the U-Net's block structure, not from layer
names), CLIP prompts with per-class token weights, VAE latents, DDPM noising at
an integer timestep, and the capture processors of :mod:`.capture`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from stableseg_pp.backbones.base import (
    AttentionSite,
    AttentionStore,
    CaptureRequest,
    Generators,
    TextConditioning,
    draw_noise,
    vae_latents,
    vae_pixels,
)
from stableseg_pp.backbones.capture import CrossAttentionMapProcessor, SelfAttentionQKProcessor
from stableseg_pp.backbones.installer import PROCESSOR_SUFFIX, ProcessorInstaller, SiteCapture
from stableseg_pp.backbones.loading import (
    ALIASES,
    apply_lora,
    lora_identity,
    lora_weights_file,
    model_identity,
    offline_hint,
    parse_dtype,
    resolve_model_path,
)
from stableseg_pp.backbones.modulation import ModulatedAttentionProcessor, ModulationState
from stableseg_pp.backbones.prompts import map_class_tokens
from stableseg_pp.runtime.errors import ConfigError, one_line

MINIATURE_MODEL = ALIASES["miniature"]
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def unet_sites(unet, latent_hw: tuple[int, int]) -> list[AttentionSite]:
    """Every attention site of a ``UNet2DConditionModel``, from its block structure.

    Down block ``i`` works at latent/2^i, the mid block at the coarsest level, up
    block ``i`` mirrors down block ``n-1-i`` (each block but the last one
    downsamples, as in every SD 1.x/2.x U-Net). In a ``BasicTransformerBlock``,
    ``attn1`` attends to the image and ``attn2`` to the text (``encoder_hidden_states``).
    """
    n_down = len(unet.config.down_block_types)
    n_up = len(unet.config.up_block_types)
    stage_order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    entries = []
    for index, name in enumerate(unet.attn_processors):
        path = name.removesuffix(PROCESSOR_SUFFIX)
        parts = path.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "up_blocks":
            level = n_up - 1 - int(parts[1])
        elif parts[0] == "mid_block":
            level = n_down - 1
        else:
            raise ValueError(f"unexpected attention layer {name!r}: not a U-Net down, mid or up block")
        module = unet.get_submodule(path)
        kind = "cross" if module.is_cross_attention else "self"
        grid = (latent_hw[0] // 2**level, latent_hw[1] // 2**level)
        entries.append(((stage_order[parts[0]], index), path, kind, grid, module.heads))
    entries.sort(key=lambda e: e[0])  # forward order: down blocks, mid block, up blocks
    return [
        AttentionSite(id=path, kind=kind, grid=grid, depth=d, heads=heads)
        for d, (_, path, kind, grid, heads) in enumerate(entries)
    ]


class SDUNetBackbone:
    """Stable Diffusion 1.x/2.x (and the miniature model) behind the backbone interface.

    Args:
        name: the preset's name (``diffusion.name``).
        pretrained: ``miniature``, a local diffusers folder, or a hub id.
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        timestep: the DDPM timestep the U-Net is told (StableSeg: 1).
        add_noise: noise the clean latent to ``timestep`` with the scheduler (seeded by the caller).
        single_file_config: for a single-file checkpoint (``pretrained=model.safetensors``): a diffusers folder or
            hub id of the same architecture whose component configs it takes (None: the hub's default for the file).
        lora: a diffusers-format LoRA of the U-Net, loaded with the pipeline's ``load_lora_weights`` and fused; its
            fingerprint is part of :meth:`identity`.
    """

    family = "sd_unet"

    def __init__(
        self,
        name: str = "sd_unet",
        pretrained: str = "miniature",
        dtype: str = "float32",
        timestep: int = 1,
        add_noise: bool = False,
        single_file_config: str | None = None,
        lora: str | None = None,
    ):
        self.name = name
        self.lora = str(lora) if lora else None
        if self.lora:
            lora_weights_file(self.lora)  # a clear error before any weights load
        self.pretrained = str(pretrained)
        self.dtype = parse_dtype(dtype)
        self.timestep = int(timestep)
        self.add_noise = bool(add_noise)
        self.single_file_config = single_file_config
        self.vae = self.unet = self.text_encoder = self.tokenizer = self.scheduler = None
        self._processors = ProcessorInstaller(AttnProcessor2_0, "this U-Net")
        self._meta: tuple[Any, Any, Any] | None = None  # the structure read from the configs, before loading
        self._ddim = None  # EmerDiff's sampler

    @property
    def stochastic(self) -> bool:
        return self.add_noise

    @classmethod
    def from_components(cls, vae, unet, text_encoder, tokenizer, scheduler, **kwargs) -> SDUNetBackbone:
        """A backbone from modules already built (tests, the miniature model's training); their modes are kept."""
        backbone = cls(**kwargs)
        backbone._set_components(vae, unet, text_encoder, tokenizer, scheduler)
        return backbone

    def _set_components(self, vae, unet, text_encoder, tokenizer, scheduler) -> None:
        self.vae, self.unet, self.text_encoder, self.tokenizer, self.scheduler = vae, unet, text_encoder, tokenizer, scheduler

    @property
    def loaded(self) -> bool:
        return self.unet is not None

    def _source(self) -> tuple[str, bool]:
        """The folder, single file or hub id to read, and whether it is local; a clear error when it is none of them."""
        source = resolve_model_path(self.pretrained)
        local = Path(source).expanduser()
        if local.is_file():
            if local.suffix not in SINGLE_FILE_SUFFIXES:
                raise ConfigError(
                    f"diffusion.pretrained={self.pretrained}: a file, but not a single-file checkpoint "
                    f"({', '.join(SINGLE_FILE_SUFFIXES)}); pass such a file or a diffusers folder"
                )
            return str(local), True
        if local.exists():
            if not (local / "model_index.json").exists():
                raise ConfigError(
                    f"diffusion.pretrained={self.pretrained}: {local} is not a diffusers pipeline folder (no "
                    "model_index.json); pass a folder written by save_pretrained, a single-file checkpoint "
                    "(.safetensors/.ckpt) or a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
                )
            return str(local), True
        if "/" not in source or source.startswith((".", "/", "~")):
            raise ConfigError(
                f"diffusion.pretrained={self.pretrained!r}: no such folder, and not a hub id of the form 'org/name'"
            )
        return source, False

    @property
    def single_file(self) -> bool:
        return Path(resolve_model_path(self.pretrained)).expanduser().is_file()

    def _configs_source(self) -> str:
        """Where the component configs are: the diffusers folder or hub id, or for a single file ``single_file_config``."""
        source, _ = self._source()  # a clear error for a path that is no model at all
        if not self.single_file:
            return source
        if not self.single_file_config:
            raise LookupError("a single-file checkpoint without diffusion.single_file_config: configs from the hub")
        return str(Path(resolve_model_path(self.single_file_config)).expanduser())

    def load(self) -> SDUNetBackbone:
        if self.loaded:
            return self
        from diffusers import StableDiffusionPipeline
        from diffusers.loaders.single_file_utils import SingleFileComponentError

        source, is_local = self._source()
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
                if self.single_file:
                    # the weights from the file, the component configs from single_file_config (else the hub)
                    config = self.single_file_config and str(Path(resolve_model_path(self.single_file_config)).expanduser())
                    pipe = StableDiffusionPipeline.from_single_file(
                        source,
                        config=config or None,
                        torch_dtype=self.dtype,
                        safety_checker=None,
                        requires_safety_checker=False,
                        local_files_only=offline or bool(config and Path(config).exists()),
                    )
                else:
                    pipe = StableDiffusionPipeline.from_pretrained(
                        source,
                        torch_dtype=self.dtype,
                        safety_checker=None,
                        requires_safety_checker=False,
                        local_files_only=is_local or offline,
                    )
        except (OSError, ValueError, SingleFileComponentError) as err:
            if self.single_file:
                raise ConfigError(
                    f"diffusion.pretrained={self.pretrained}: the single-file checkpoint could not be loaded "
                    f"({one_line(err)}). Set diffusion.single_file_config to a diffusers folder (or hub id) of the same "
                    "architecture, e.g. a local copy of stable-diffusion-v1-5/stable-diffusion-v1-5, for its configs"
                ) from err
            raise ConfigError(offline_hint(self.pretrained, one_line(err))) from err
        if self.lora:
            apply_lora(pipe, self.lora)
        self._set_components(pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
        for module in self.modules().values():
            module.eval().requires_grad_(False)
        return self

    def _structure(self) -> tuple[Any, Any, Any]:
        """(U-Net, VAE config, tokenizer): the loaded ones, or before loading the U-Net built on the meta device from
        its config (no weights read) and the tokenizer, so that settings are checked before any weights load.
        Raises ``LookupError`` when the configs cannot be read without downloading (a hub id not in the cache)."""
        if self.loaded:
            return self.unet, self.vae.config, self.tokenizer
        if self._meta is None:
            from diffusers import AutoencoderKL, UNet2DConditionModel
            from transformers import AutoTokenizer

            source = self._configs_source()
            try:
                unet_config = UNet2DConditionModel.load_config(source, subfolder="unet", local_files_only=True)
                vae_config = AutoencoderKL.load_config(source, subfolder="vae", local_files_only=True)
                tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=True)
            except (OSError, ValueError) as err:
                raise LookupError(f"{source}: configs not available without downloading ({err})") from err
            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(unet_config)
            self._meta = (unet, SimpleNamespace(**vae_config), tokenizer)
        return self._meta

    def identity(self) -> dict[str, Any]:
        dtype = str(self.dtype).removeprefix("torch.")
        return {"family": self.family, "dtype": dtype, **model_identity(self.pretrained), **lora_identity(self.lora)}

    def modules(self) -> dict[str, torch.nn.Module]:
        self._require_loaded()
        return {"vae": self.vae, "unet": self.unet, "text_encoder": self.text_encoder}

    def _require_loaded(self) -> None:
        if not self.loaded:
            raise RuntimeError(f"backbone {self.name!r} is not loaded: call load() first")

    # -- geometry -------------------------------------------------------------------------------------------------

    def latent_grid(self, resolution: int) -> tuple[int, int]:
        unet, vae_config, _ = self._structure()
        scale = 2 ** (len(vae_config.block_out_channels) - 1)
        levels = len(unet.config.down_block_types) - 1
        multiple = scale * 2**levels
        if resolution % multiple:
            raise ConfigError(f"zero_shot.resolution={resolution} must be a multiple of {multiple} for this backbone")
        return resolution // scale, resolution // scale

    def sites(self, resolution: int) -> list[AttentionSite]:
        return unet_sites(self._structure()[0], self.latent_grid(resolution))

    def check_prompt(self, class_names: Sequence[str], template: str, joiner: str) -> None:
        map_class_tokens(self._structure()[2], class_names, template, joiner)

    # -- encoding, noising, forward ---------------------------------------------------------------------------------

    def encode_text(self, class_names: Sequence[Sequence[str]], template: str, joiner: str) -> TextConditioning:
        self._require_loaded()
        tok = self.tokenizer
        device = self.text_encoder.device
        length = tok.model_max_length
        mapped = [map_class_tokens(tok, names, template, joiner) for names in class_names]
        k = max(len(m.positions) for m in mapped)
        ids = torch.full((len(mapped), length), tok.pad_token_id, dtype=torch.long)
        weights = torch.zeros(len(mapped), length, k)
        valid = torch.zeros(len(mapped), k, dtype=torch.bool)
        for i, m in enumerate(mapped):
            ids[i, : len(m.input_ids)] = torch.tensor(m.input_ids)
            weights[i, :, : len(m.positions)] = m.weight_matrix(length)
            valid[i, : len(m.positions)] = True
        emb = self.text_encoder(ids.to(device))[0]
        return TextConditioning(embeddings=emb, token_weights=weights.to(device), valid=valid.to(device))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return vae_latents(self.vae, pixels)

    def noise(self, latents: torch.Tensor, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full((latents.shape[0],), self.timestep, device=latents.device, dtype=torch.long)
        if self.add_noise:
            noise = draw_noise(latents, generator)
            latents = self.scheduler.add_noise(latents, noise, t)
        return latents, t

    def denoise(self, latents: torch.Tensor, time: torch.Tensor, text: TextConditioning) -> torch.Tensor:
        unet = self.unet
        return unet(latents.to(unet.dtype), time, encoder_hidden_states=text.embeddings.to(unet.dtype)).sample

    # -- sampling (EmerDiff) ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_captions(self, prompts: Sequence[str]) -> TextConditioning:
        self._require_loaded()
        tok = self.tokenizer
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids  # fmt: skip
        emb = self.text_encoder(ids.to(self.text_encoder.device))[0]
        b, length = emb.shape[:2]
        return TextConditioning(emb, emb.new_zeros(b, length, 0), torch.zeros(b, 0, dtype=torch.bool, device=emb.device))

    def _sampler(self):
        """A deterministic DDIM sampler (eta 0) on the pipeline's noise schedule: modulated runs differ only by
        their modulation."""
        if self._ddim is None:
            from diffusers import DDIMScheduler

            self._ddim = DDIMScheduler.from_config(self.scheduler.config, clip_sample=False)
        return self._ddim

    def sampling_times(self, start: int, steps: int, latents: torch.Tensor | None = None) -> list[int]:
        sampler = self._sampler()
        sampler.set_timesteps(int(steps))
        times = [int(t) for t in sampler.timesteps if int(t) <= int(start)]
        if not times:
            raise ConfigError(f"emerdiff.timestep={start}: no step of a {steps}-step schedule is at or before it")
        return times

    def noise_to(self, latents: torch.Tensor, time: int, noise: torch.Tensor) -> torch.Tensor:
        t = torch.full((latents.shape[0],), int(time), device=latents.device, dtype=torch.long)
        return self.scheduler.add_noise(latents, noise.to(latents), t)

    def prediction_target(self, latents: torch.Tensor, noise: torch.Tensor, time: int) -> torch.Tensor:
        if self.scheduler.config.prediction_type == "v_prediction":
            t = torch.full((latents.shape[0],), int(time), device=latents.device, dtype=torch.long)
            return self.scheduler.get_velocity(latents, noise.to(latents), t)
        return noise.to(latents)

    def sampler_step(self, prediction: torch.Tensor, time: int, latents: torch.Tensor) -> torch.Tensor:
        return self._sampler().step(prediction.to(latents.dtype), int(time), latents, eta=0.0).prev_sample

    def time_input(self, time: int, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), int(time), device=device, dtype=torch.long)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_pixels(self.vae, latents)

    def install_modulation(self, state: ModulationState, site: str) -> None:
        self._require_loaded()
        self._processors.install_all(
            self.unet,
            self._site_kinds(),
            lambda s: ModulatedAttentionProcessor(state, s.id, modulated=s.id == site),
            named=site,
            what="emerdiff.site",
        )

    # -- capture ------------------------------------------------------------------------------------------------------

    def _site_kinds(self) -> list[AttentionSite]:
        """The site records that choose processors (only kinds and ids matter there, not grids: any latent size does)."""
        return unet_sites(self.unet, (0, 0))

    def install_capture(self, request: CaptureRequest, store: AttentionStore) -> None:
        self._require_loaded()
        self._processors.install_capture(self.unet, self._site_kinds(), request, store, unet_capture_processor)

    def remove_capture(self) -> None:
        self._require_loaded()
        self._processors.remove(self.unet)


def unet_capture_processor(
    site: AttentionSite, wants: SiteCapture, store: AttentionStore
) -> CrossAttentionMapProcessor | SelfAttentionQKProcessor:
    """Cross-attention sites give class maps; Q/K (self-attention for SAR, or EmerDiff's Query features) on any."""
    if wants.text_logits:
        raise ValueError(f"site {site.id}: the U-Net family does not keep text logits (MAGNET needs an MM-DiT)")
    if wants.class_maps:
        return CrossAttentionMapProcessor(store, site.id, per_head=wants.head_maps)
    return SelfAttentionQKProcessor(store, site.id)
