"""The diffusion-backbone interface that every family implements, and its attention sites.

StableSeg, the stage-0 module, ``segment``, MAGNET and EmerDiff talk to a
backbone only through :class:`DiffusionBackbone` (and :class:`GenerativeBackbone`):
they never ask which family it is. A family (the SD 1.x/2.x U-Net in
:mod:`stableseg_pp.backbones.sd_unet`, the SD3/SD3.5 MM-DiT in
:mod:`stableseg_pp.backbones.sd3_mmdit`) decides in its own code which attention
sites it has, how text and images are encoded, how a latent is noised and how
capture processors are installed.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from stableseg_pp.runtime.errors import ConfigError

SITE_KINDS = ("self", "cross", "joint")


@dataclass(frozen=True)
class AttentionSite:
    """One attention computation of the denoiser whose maps can be captured.

    Args:
        id: stable name, decided by the family (keys stored maps and learned weights).
        kind: ``self`` (image -> image), ``cross`` (image -> text) or ``joint`` (image and text together).
        grid: (h, w) of its map at the configured input resolution.
        depth: its order in the forward pass (0 = first).
        heads: its number of attention heads (per-head maps: :func:`head_map_id`).
    """

    id: str
    kind: str
    grid: tuple[int, int]
    depth: int
    heads: int = 1

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"attention site {self.id!r}: kind {self.kind!r} is not one of {SITE_KINDS}")

    @property
    def attends_to_text(self) -> bool:
        """Gives image-to-text maps (class maps for CAPM)."""
        return self.kind in ("cross", "joint")

    @property
    def attends_to_image(self) -> bool:
        """Gives image-to-image attention (Query/Key features for SAR)."""
        return self.kind in ("self", "joint")

    @property
    def side(self) -> int:
        """The map's longer side (the "scale" of StableSeg's tables)."""
        return max(self.grid)


HEAD_MARK = "/head"


def head_map_id(site_id: str, head: int) -> str:
    """The id of one head's class map of a site (stored maps and learned weights): ``<site id>/head<h>``."""
    return f"{site_id}{HEAD_MARK}{head}"


def parse_map_id(map_id: str) -> tuple[str, int | None]:
    """``<site id>`` -> (site id, None) (the head-mean map); ``<site id>/head<h>`` -> (site id, h)."""
    site, mark, head = map_id.rpartition(HEAD_MARK)
    if mark and head.isdigit():
        return site, int(head)
    return map_id, None


@dataclass
class TextConditioning:
    """Encoded prompts of a batch, and where each class's tokens are.

    Args:
        embeddings: what the denoiser takes as text input (family-specific tensors).
        token_weights: (B, T, K) matrix averaging each class's token columns into one class map.
        valid: (B, K) the classes each image's prompt names (images name different numbers of classes).
    """

    embeddings: Any
    token_weights: torch.Tensor
    valid: torch.Tensor

    def expand(self, batch: int) -> TextConditioning:
        """A one-prompt conditioning repeated for ``batch`` images (embeddings: a tensor or a tuple of tensors)."""

        def rep(t: torch.Tensor) -> torch.Tensor:
            return t.expand(batch, *t.shape[1:])

        emb = tuple(rep(e) for e in self.embeddings) if isinstance(self.embeddings, tuple) else rep(self.embeddings)
        return TextConditioning(emb, rep(self.token_weights), rep(self.valid))


@dataclass(frozen=True)
class CaptureRequest:
    """What a forward should record.

    Args:
        class_maps: site ids whose per-class image-to-text maps are stored (head mean, HW x classes).
        query_keys: site ids whose image Query/Key features are kept (for SAR; never an HW x HW map).
        text_logits: site ids whose pre-softmax image-to-text logits per class are kept, with gradients (MAGNET).
        head_maps: site ids (among ``class_maps``) whose class maps are also kept per head (per-head weights, the
            layer analysis).
    """

    class_maps: tuple[str, ...] = ()
    query_keys: tuple[str, ...] = ()
    text_logits: tuple[str, ...] = ()
    head_maps: tuple[str, ...] = ()


@dataclass
class AttentionStore:
    """What one forward captured, keyed by site id; reset before each forward."""

    token_weights: torch.Tensor | None = None  # (B, T, C): averages each class's tokens
    latent_hw: tuple[int, int] = (0, 0)
    cross: dict[str, torch.Tensor] = field(default_factory=dict)  # site id -> (B, C, h, w)
    cross_heads: dict[str, torch.Tensor] = field(default_factory=dict)  # site id -> (B, heads, C, h, w)
    self_qk: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (B, heads, N, d)
    text_logits: dict[str, torch.Tensor] = field(default_factory=dict)  # site id -> (B, C, h, w), with gradients

    def reset(self, token_weights: torch.Tensor | None, latent_hw: tuple[int, int]) -> None:
        self.token_weights = token_weights
        self.latent_hw = latent_hw
        self.cross.clear()
        self.cross_heads.clear()
        self.self_qk.clear()
        self.text_logits.clear()

    def map_shape(self, n_tokens: int) -> tuple[int, int]:
        """Side lengths of a site's map from its number of image tokens."""
        h, w = self.latent_hw
        factor = (h * w / n_tokens) ** 0.5
        return round(h / factor), round(w / factor)

    def class_maps(self) -> dict[str, torch.Tensor]:
        """Map id -> (B, C, h, w): every site's head-mean map, and each kept head's map (:func:`head_map_id`)."""
        maps = dict(self.cross)
        for site, heads in self.cross_heads.items():
            maps.update({head_map_id(site, i): heads[:, i] for i in range(heads.shape[1])})
        return maps


@dataclass
class ModulationState:
    """What the processors of one batched EmerDiff forward read (shared by every layer).

    Args:
        reference: (B,) the batch index of each run's reference run (a reference points to itself); None: no
            injection (every run attends with its own Q and K, as the stock processor).
        offset: (B, N) added to the modulated layer's output (N: its image tokens); None: no modulation.
    """

    reference: torch.Tensor | None = None
    offset: torch.Tensor | None = None


@runtime_checkable
class DiffusionBackbone(Protocol):
    """What every backbone family provides (one module per family, selected by ``diffusion._target_``).

    A backbone is built from its config cheaply; :meth:`load` reads the weights
    (each rank calls it itself). :meth:`latent_grid`, :meth:`sites` and
    :meth:`check_prompt` also work before loading when the family can read its
    model's configs (then settings are checked before any weights load; they
    raise ``LookupError`` when it cannot); every other method below
    :meth:`identity` needs the weights loaded.
    """

    #: the family's name, stored with every map and learned weight (e.g. ``sd_unet``)
    family: str
    #: the preset's name (``diffusion.name``)
    name: str
    #: True when stage 0's result depends on the random seed (noised latents)
    stochastic: bool

    def load(self) -> DiffusionBackbone:
        """Read the weights (alias, local folder or hub id); a no-op when loaded."""
        ...

    def identity(self) -> dict[str, Any]:
        """What the weights are, for content addressing (a fingerprint, never a machine path; later adapters)."""
        ...

    def modules(self) -> dict[str, torch.nn.Module]:
        """The torch modules, to register as sub-modules (so ``.to(device)`` and Lightning move them)."""
        ...

    def latent_grid(self, resolution: int) -> tuple[int, int]:
        """(h, w) of the latent for a square input of side ``resolution``; a clear error when it does not fit."""
        ...

    def sites(self, resolution: int) -> list[AttentionSite]:
        """Every attention site, in forward order, with its map grid at ``resolution``."""
        ...

    def check_prompt(self, class_names: Sequence[str], template: str, joiner: str) -> None:
        """A clear error (``PromptTooLongError``) when a prompt naming ``class_names`` does not fit the text encoder."""
        ...

    def encode_text(self, class_names: Sequence[Sequence[str]], template: str, joiner: str) -> TextConditioning:
        """One prompt per image naming its classes (``template`` filled with the names joined by ``joiner``)."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) pixels in [-1, 1] -> latents as the denoiser takes them (no sampling)."""
        ...

    def noise(self, latents: torch.Tensor, generator: Generators = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The latents at the configured time (noised or not) and that time, as the denoiser takes it; the noise
        from ``generator`` (:func:`draw_noise`)."""
        ...

    def denoise(self, latents: torch.Tensor, time: torch.Tensor, text: TextConditioning) -> torch.Tensor:
        """One denoiser forward; captures whatever the installed processors record."""
        ...

    def install_capture(self, request: CaptureRequest, store: AttentionStore) -> None:
        """Capture processors on the requested sites, the fused stock processor everywhere else."""
        ...

    def remove_capture(self) -> None:
        """The stock processors on every site."""
        ...


@dataclass
class TrainingSample:
    """What a training step of the denoiser needs from its family's objective (one draw of time and noise).

    Args:
        noisy: (B, ...) the latents at the drawn times, as the denoiser takes them.
        time: (B,) the drawn times, as the denoiser takes them.
        target: what the denoiser should predict there (flow matching: ``noise - latents``).
        weighting: per-sample loss weights broadcastable to ``target`` (e.g. ``compute_loss_weighting_for_sd3``).
    """

    noisy: torch.Tensor
    time: torch.Tensor
    target: torch.Tensor
    weighting: torch.Tensor


@runtime_checkable
class TrainableBackbone(DiffusionBackbone, Protocol):
    """A backbone whose denoiser can be fine-tuned with LoRA (MAGNET): its training objective and adapter format."""

    @property
    def denoiser(self) -> torch.nn.Module:
        """The module the sites live in: site ids are its submodule paths (LoRA targets are found there)."""
        ...

    def training_sample(self, latents: torch.Tensor, generator: torch.Generator | None = None, **objective) -> TrainingSample:
        """Draw times and noise for ``latents`` as the family's training objective does (``objective``: its settings)."""
        ...

    def encode_captions(self, prompts: Sequence[str]) -> TextConditioning:
        """Plain prompts encoded as the pipeline encodes them for generation (no class maps)."""
        ...

    def save_lora(self, folder: str | Path, lora_state: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
        """Write the denoiser's LoRA weights in the diffusers format its pipeline's ``load_lora_weights`` reads."""
        ...


@runtime_checkable
class NoisingBackbone(DiffusionBackbone, Protocol):
    """A backbone that noises a clean latent to a chosen time and says what its denoiser predicts there: enough to
    read the denoising error of a prompt (the diffusion labeler) on either training objective."""

    def encode_captions(self, prompts: Sequence[str]) -> TextConditioning:
        """Plain prompts encoded as the pipeline encodes them for generation (no class maps)."""
        ...

    def noise_to(self, latents: torch.Tensor, time: int, noise: torch.Tensor) -> torch.Tensor:
        """Clean latents noised to ``time`` (training-schedule units, 0..1000) with ``noise``, as the training
        objective does."""
        ...

    def prediction_target(self, latents: torch.Tensor, noise: torch.Tensor, time: int) -> torch.Tensor:
        """What the denoiser predicts at ``time`` for clean ``latents`` noised with ``noise`` (its training target:
        the noise, the velocity of a v-prediction model, or the flow ``noise - latents``); the denoising error is
        measured against it."""
        ...

    def time_input(self, time: int, batch: int, device: torch.device) -> torch.Tensor:
        """``time`` as :meth:`denoise` takes it for a batch."""
        ...


@runtime_checkable
class GenerativeBackbone(NoisingBackbone, Protocol):
    """A backbone that also runs its sampler (EmerDiff): noise a clean latent to a chosen time, denoise it step by
    step with attention injection and a modulated layer, decode the result."""

    def sampling_times(self, start: int, steps: int, latents: torch.Tensor | None = None) -> list[int]:
        """The times the sampler visits from ``start`` (in the training schedule's units) to the end, when its whole
        schedule has ``steps`` steps; the first is the latest time not after ``start``. ``latents``: the batch about to
        be sampled, for a schedule that depends on the image size (None: a check before any image)."""
        ...

    def sampler_step(self, prediction: torch.Tensor, time: int, latents: torch.Tensor) -> torch.Tensor:
        """One deterministic sampler step from ``time`` (the denoiser's ``prediction`` there) to the next time."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents as the denoiser takes them -> (B, 3, R, R) pixels in [-1, 1]."""
        ...

    def install_modulation(self, state: ModulationState, site: str) -> None:
        """EmerDiff's processors on every attention layer (injection from ``state.reference``), ``site`` modulated by
        ``state.offset``; :meth:`remove_capture` puts the stock processors back."""
        ...


#: where noise comes from: one generator per image (the same noise whatever the batch, rank or resumed run), one
#: generator for the batch, or None (torch's global generator)
Generators = torch.Generator | Sequence[torch.Generator] | None


def draw_noise(latents: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise shaped like ``latents``: with a generator per image, each image's draw from its own
    (drawn where the generators live, then moved to the latents' device)."""
    if isinstance(generator, Sequence):
        if len(generator) != latents.shape[0]:
            raise ValueError(f"{len(generator)} generators for {latents.shape[0]} latents: give one per image")
        draws = [torch.randn(latents.shape[1:], generator=g, device=g.device) for g in generator]
        return torch.stack(draws).to(latents.device, latents.dtype)
    return torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)


def image_generators(seed: int, ids: Sequence[str]) -> list[torch.Generator]:
    """A CPU generator per image, seeded from the run's ``seed`` and the image's id."""
    return [torch.Generator().manual_seed(int(seed) * 1_000_003 + zlib.crc32(i.encode())) for i in ids]


def vae_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, R, R) pixels in [-1, 1] -> the latent mean, shifted and scaled as the denoiser takes it."""
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def vae_pixels(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents as the denoiser takes them (scaled and shifted) -> (B, 3, R, R) pixels in [-1, 1]."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    pixels = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
    return pixels.float().clamp(-1, 1)


def select_sites(
    sites: Iterable[AttentionSite],
    which: str,
    sides: Iterable[int] | str = "all",
    depths: Iterable[int] | None = None,
    setting: str = "scales",
    depth_setting: str = "depths",
) -> list[AttentionSite]:
    """The sites that give ``which`` maps (``text``: class maps, ``image``: Q/K for SAR), by map side and/or depth.

    ``sides``: "all" or map side lengths (U-Nets' scales); ``depths``: positions
    in the forward (MM-DiT blocks). A requested value that no site has is a clear
    error naming the setting (``setting`` for sides, ``depth_setting`` for depths) and the values that exist.
    """
    if which not in ("text", "image"):
        raise ValueError(f"select_sites: which={which!r} must be 'text' or 'image'")
    pool = [s for s in sites if (s.attends_to_text if which == "text" else s.attends_to_image)]
    if sides != "all":
        wanted = {int(s) for s in sides}
        available = sorted({s.side for s in pool})
        if missing := wanted - set(available):
            raise ConfigError(
                f"{setting}={sorted(wanted)}: map sides {sorted(missing)} do not exist for this backbone at this "
                f"resolution; available: {available}"
            )
        pool = [s for s in pool if s.side in wanted]
    if depths is not None:
        wanted = {int(d) for d in depths}
        available = sorted({s.depth for s in pool})
        if missing := wanted - set(available):
            raise ConfigError(
                f"{depth_setting}={sorted(wanted)}: depths {sorted(missing)} do not exist for this backbone; "
                f"available: {available}"
            )
        pool = [s for s in pool if s.depth in wanted]
    return pool
