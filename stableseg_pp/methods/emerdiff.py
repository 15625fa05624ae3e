"""EmerDiff: pixel-level masks from the generation process (Namekata et al. 2024; docs/emerdiff.md).

Low-resolution segments (StableSeg's classes at one attention layer's grid, or
k-means clusters of that layer's Query features) are turned into an
image-resolution map by asking the diffusion model which pixels each segment
controls: for segment ``i``, the clean latent is noised to ``t_m``, the chosen
cross-attention layer's output gets ``c * M_i`` added (``c = -lambda`` and
``c = +lambda``) at that first step, the latent is denoised to the end with
every layer's attention probabilities injected from the unmodulated run, both
results are decoded, and the per-pixel RGB distance ``||I- - I+||`` (Gaussian
smoothed) says how much the pixel depends on the segment. Each pixel takes the
segment that changes it most.

The 2K modulated runs of an image are independent: they run batched, together
with their unmodulated reference run (whose Query/Key every run attends with),
``runs_per_forward`` runs per denoiser forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from stableseg_pp.backbones.base import AttentionStore, CaptureRequest, GenerativeBackbone, TextConditioning
from stableseg_pp.backbones.modulation import ModulationState
from stableseg_pp.runtime.errors import ConfigError

# EmerDiff's arguments that change how fast it runs, never its results (left out of content keys)
SPEED_ONLY = ("runs_per_forward",)


def check_settings(
    site: object = None,
    timestep: object = 281,
    sampler_steps: object = 50,
    strength: object = 10.0,
    sigma: object = 1.0,
    runs_per_forward: object = 16,
    prompt: object = "",
) -> None:
    """EmerDiff's settings (the ``emerdiff`` node), checked by its constructor and by ``fit`` before any weights load;
    a bad value is a :class:`ConfigError` naming the setting."""
    if not site:
        raise ConfigError(
            "emerdiff.site is not set: give the id of the image-to-text attention site to modulate (the U-Net presets "
            "set the first cross-attention of the 16x16 up block, the MM-DiT presets their grounding block, e.g. "
            "emerdiff.site=transformer_blocks.9.attn)"
        )
    for key, value in (("sampler_steps", sampler_steps), ("runs_per_forward", runs_per_forward)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if key == "runs_per_forward" else 1):
            raise ConfigError(f"emerdiff.{key}={value}: give a positive whole number (runs_per_forward >= 2)")
    if isinstance(timestep, bool) or not isinstance(timestep, int) or not 0 < timestep < 1000:
        raise ConfigError(f"emerdiff.timestep={timestep}: give t_m in the training schedule, e.g. 281")
    if isinstance(strength, bool) or not isinstance(strength, int | float) or strength <= 0:
        raise ConfigError(f"emerdiff.strength={strength}: give lambda > 0 (the paper: 10)")
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or sigma < 0:
        raise ConfigError(f"emerdiff.sigma={sigma}: give the smoothing in pixels, >= 0 (0: none)")
    if not isinstance(prompt, str):
        raise ConfigError(f'emerdiff.prompt={prompt}: give a text ("" for the unconditional embedding)')


@dataclass(frozen=True)
class EmerDiffRun:
    """One modulated run: image ``image`` (its index in the batch), segment ``segment``, sign of the strength."""

    image: int
    segment: int
    sign: float


def plan_runs(segments_per_image: Sequence[Sequence[int]], runs_per_forward: int) -> list[list[EmerDiffRun]]:
    """The modulated runs of a batch of images, grouped into forwards of at most ``runs_per_forward`` runs, each
    forward also holding one reference run per image it serves (so ``runs_per_forward >= 2``)."""
    if runs_per_forward < 2:
        raise ValueError(f"emerdiff.runs_per_forward={runs_per_forward}: needs at least 2 (a reference and a run)")
    runs = [EmerDiffRun(i, s, sign) for i, segs in enumerate(segments_per_image) for s in segs for sign in (-1.0, 1.0)]
    groups: list[list[EmerDiffRun]] = []
    current: list[EmerDiffRun] = []
    for run in runs:
        images = {r.image for r in current} | {run.image}
        if current and len(current) + 1 + len(images) > runs_per_forward:
            groups.append(current)
            current = []
        current.append(run)
    if current:
        groups.append(current)
    return groups


def segment_offsets(segments: torch.Tensor, segment: int, strength: float) -> torch.Tensor:
    """``strength * M_segment`` flattened over the layer's tokens: (h, w) segment ids -> (h * w,)."""
    return (segments.flatten() == segment).float() * strength


def pixel_change(minus: torch.Tensor, plus: torch.Tensor) -> torch.Tensor:
    """Per-pixel RGB L2 distance of (..., 3, H, W) images -> (..., H, W)."""
    return (minus.float() - plus.float()).pow(2).sum(dim=-3).sqrt()


def assign_pixels(change: torch.Tensor, size: tuple[int, int] | None = None, sigma: float = 0.0) -> torch.Tensor:
    """(K, H, W) change maps -> (H', W') index of the segment whose modulation changes each pixel most.

    The maps are smoothed with a Gaussian of ``sigma`` pixels (0: none) and resized bilinearly to ``size``.
    """
    smoothed = smooth_change(change, sigma)
    if size is not None and tuple(size) != tuple(smoothed.shape[-2:]):
        smoothed = F.interpolate(smoothed[None], size=size, mode="bilinear", align_corners=False)[0]
    return smoothed.argmax(dim=0)


def smooth_change(change: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of (K, H, W) change maps (kernel of about 3 sigma each side)."""
    if sigma <= 0:
        return change.float()
    kernel = 2 * int(np.ceil(3 * sigma)) + 1
    return gaussian_blur(change.float()[None], [kernel, kernel], [float(sigma), float(sigma)])[0]


def majority_segments(scores: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(C, h, w) class scores and (C,) valid channels -> (gh, gw) channel ids at the modulated layer's grid."""
    pooled = F.adaptive_avg_pool2d(scores.float()[None], grid)[0]
    return pooled.masked_fill(~valid[:, None, None], float("-inf")).argmax(dim=0)


class EmerDiff:
    """EmerDiff's modulated denoising on a backbone that can sample (:class:`GenerativeBackbone`).

    Args:
        backbone: the backbone, loaded.
        site: the attention site whose output is modulated (the issue's first cross-attention of the 16x16 up block).
        grid: (h, w) of that site's map.
        timestep: t_m, the time of the modulation (paper: 281; 281-481 best).
        sampler_steps: steps of the sampler's whole schedule; the steps from t_m to the end are run.
        strength: lambda (paper: 10).
        sigma: Gaussian smoothing of the change maps, in pixels of the decoded image.
        runs_per_forward: runs (references included) per batched denoiser forward.
        prompt: the text of every run (empty: the unconditional embedding).
    """

    def __init__(
        self,
        backbone: GenerativeBackbone,
        site: str,
        grid: tuple[int, int],
        timestep: int = 281,
        sampler_steps: int = 50,
        strength: float = 10.0,
        sigma: float = 1.0,
        runs_per_forward: int = 16,
        prompt: str = "",
    ):
        check_settings(site, timestep, sampler_steps, strength, sigma, runs_per_forward, prompt)
        self.backbone = backbone
        self.site = site
        self.grid = tuple(grid)
        self.timestep = int(timestep)
        self.sampler_steps = int(sampler_steps)
        self.strength = float(strength)
        self.sigma = float(sigma)
        self.runs_per_forward = int(runs_per_forward)
        self.prompt = prompt
        self.times = backbone.sampling_times(self.timestep, self.sampler_steps)
        self._text: TextConditioning | None = None
        self.forwards = 0  # batch rows through the denoiser so far (each row of a batched forward counts once)

    def text(self, batch: int) -> TextConditioning:
        if self._text is None:
            self._text = self.backbone.encode_captions([self.prompt])
        return self._text.expand(batch)

    @torch.no_grad()
    def change_maps(
        self, latents: torch.Tensor, segments: Sequence[torch.Tensor], noise: torch.Tensor
    ) -> list[dict[int, torch.Tensor]]:
        """For each image: segment id -> (R, R) pixel change ``||I- - I+||`` of modulating that segment.

        ``latents`` (B, ...) clean latents; ``segments[b]`` the (h, w) segment ids of image b at the site's grid;
        ``noise`` (B, ...) the noise that takes each latent to t_m (the same for all of an image's runs).
        """
        present = [sorted(int(s) for s in torch.unique(seg).tolist()) for seg in segments]
        # (re)sets the sampler's schedule, for these latents' size where the schedule depends on it
        self.times = self.backbone.sampling_times(self.timestep, self.sampler_steps, latents)
        images: dict[tuple[int, int, float], torch.Tensor] = {}
        state = ModulationState()
        self.backbone.install_modulation(state, self.site)
        try:
            start = self.backbone.noise_to(latents, self.times[0], noise)
            for group in plan_runs(present, self.runs_per_forward):
                served = sorted({r.image for r in group})
                rows = served + [r.image for r in group]  # references first, then the modulated runs
                reference = torch.tensor([served.index(i) for i in rows], device=latents.device)
                offsets = torch.zeros(len(rows), self.grid[0] * self.grid[1], device=latents.device)
                for j, run in enumerate(group):
                    offsets[len(served) + j] = segment_offsets(segments[run.image], run.segment, run.sign * self.strength)
                z = start[torch.tensor(rows, device=latents.device)]
                text = self.text(len(rows))
                state.reference = reference
                for step, t in enumerate(self.times):
                    state.offset = offsets if step == 0 else None  # modulated at t_m only
                    prediction = self.backbone.denoise(z, self.backbone.time_input(t, len(rows), z.device), text)
                    z = self.backbone.sampler_step(prediction, t, z)
                    self.forwards += len(rows)
                decoded = self.backbone.decode_latents(z[len(served) :])
                for run, image in zip(group, decoded, strict=True):
                    images[(run.image, run.segment, run.sign)] = image
        finally:
            state.reference = state.offset = None
            self.backbone.remove_capture()
        return [{s: pixel_change(images[(b, s, -1.0)], images[(b, s, 1.0)]) for s in segs} for b, segs in enumerate(present)]


@torch.no_grad()
def query_features(backbone: GenerativeBackbone, site: str, pixels: torch.Tensor, text: TextConditioning) -> torch.Tensor:
    """(B, 3, R, R) pixels -> (B, N, D) L2-normalised Query features of ``site`` at the backbone's stage-0 time
    (t = 1 for the U-Net presets): what EmerDiff's unsupervised mode clusters."""
    store = AttentionStore()
    backbone.install_capture(CaptureRequest(query_keys=(site,)), store)
    try:
        latents, time = backbone.noise(backbone.encode_images(pixels))
        store.reset(None, backbone.latent_grid(pixels.shape[-1]))
        backbone.denoise(latents, time, text.expand(pixels.shape[0]))
        q = store.self_qk[site][0]  # (B, heads, N, d)
    finally:
        backbone.remove_capture()
    features = q.float().transpose(1, 2).flatten(2)
    return F.normalize(features, dim=-1)


def fit_centroids(features: np.ndarray, k: int, seed: int, iterations: int = 50) -> np.ndarray:
    """k-means (scipy, k-means++ start, seeded) of (M, D) features -> (k, D) unit-length centroids."""
    from scipy.cluster.vq import kmeans2

    if len(features) < k:
        raise ConfigError(f"emerdiff_steps.clusters={k}: only {len(features)} feature vectors to cluster; use fewer clusters")
    centroids, _ = kmeans2(features.astype(np.float64), k, iter=int(iterations), minit="++", seed=int(seed))
    norms = np.linalg.norm(centroids, axis=1, keepdims=True)
    return (centroids / np.maximum(norms, 1e-8)).astype(np.float32)


def nearest_centroid(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, N, D) features, (K, D) centroids -> (B, N) index of the nearest centroid (Euclidean, as k-means)."""
    return torch.cdist(features.float(), centroids.to(features.device, torch.float32)[None]).argmin(dim=-1)
