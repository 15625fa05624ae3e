"""StableSeg: zero-shot segmentation from one diffusion forward (docs/method.md, "Stage 0").

Image -> latent (no noise by default) -> one denoiser forward at the backbone's
configured time with a prompt naming the classes -> per-site image-to-text
class maps (CAPM) and Query/Key features of the image-to-image sites (SAR) ->
class scores. Works on any :class:`~stableseg_pp.backbones.base.DiffusionBackbone`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stableseg_pp.backbones.base import (
    AttentionSite,
    AttentionStore,
    CaptureRequest,
    DiffusionBackbone,
    Generators,
    parse_map_id,
    select_sites,
)
from stableseg_pp.backbones.prompts import PromptTooLongError, build_prompt
from stableseg_pp.methods.background import BackgroundRule, check_background_rule
from stableseg_pp.methods.capm import aggregate_maps, minmax_normalize
from stableseg_pp.methods.sar import sar_probabilities
from stableseg_pp.runtime.errors import ConfigError

MODES = ("ca", "sa", "ca+sa")


@dataclass
class StableSegOutput:
    scores: torch.Tensor  # (B, 1 + C, R, R): final class scores, channel 0 = background
    valid: torch.Tensor  # (B, 1 + C) bool: channels that name a class of this image
    capm: torch.Tensor  # (B, 1 + C, R, R) normalised CAPM with background channel
    cross_maps: dict[str, torch.Tensor]  # map id (site, or site and head) -> (B, C, h, w) raw class maps (for stage 2)

    @property
    def labels(self) -> torch.Tensor:
        """(B, R, R) channel index per pixel (0 = background, c = c-th class of the image)."""
        return self.scores.masked_fill(~self.valid[:, :, None, None], float("-inf")).argmax(dim=1)


def check_settings(
    resolution: object = 512,
    cross_scales: object = (8, 16),
    self_scales: object = "all",
    stored_cross_scales: object = "all",
    cross_depths: object = None,
    self_depths: object = None,
    stored_cross_depths: object = None,
    mode: object = "ca+sa",
    background: object = "threshold",
    prompt_template: object = "a photo of a {}",
    joiner: object = " and ",
    **_: object,
) -> None:
    """StableSeg's settings that need no backbone (the ``zero_shot`` node): checked by its constructor, and by ``fit``
    before any weights load. A bad value is a :class:`ConfigError` naming the setting."""
    if mode not in MODES:
        raise ConfigError(f"zero_shot.mode={mode}: use one of {', '.join(MODES)}")
    check_background_rule(background)
    if not _whole(resolution, 1):
        raise ConfigError(f"zero_shot.resolution={resolution}: give a positive image side in pixels, e.g. 512")
    scales = {"cross_scales": cross_scales, "self_scales": self_scales, "stored_cross_scales": stored_cross_scales}
    for key, value in scales.items():
        if value != "all" and not (_is_list(value) and all(_whole(v, 1) for v in value)):
            raise ConfigError(f"zero_shot.{key}={value}: give 'all' or a list of map sides, e.g. [8, 16]")
    depths = {"cross_depths": cross_depths, "self_depths": self_depths, "stored_cross_depths": stored_cross_depths}
    for key, value in depths.items():
        if value is not None and not (_is_list(value) and value and all(_whole(v, 0) for v in value)):
            raise ConfigError(f"zero_shot.{key}={value}: give null (every depth) or a list of block indices, e.g. [9]")
    check_prompt_template(prompt_template, joiner)


def _is_list(value: object) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _whole(value: object, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_prompt_template(template: object, joiner: object) -> None:
    """``zero_shot.prompt_template``: a text with one ``{}`` where the class names go (no other braces)."""
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ConfigError(f"zero_shot.prompt_template={template!r}: give a text with one {{}} for the class names, "
                          "e.g. 'a photo of a {}'")  # fmt: skip
    try:
        build_prompt(["x"], template, str(joiner))
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"zero_shot.prompt_template={template!r}: {err}; write a literal brace as {{{{ or }}}}") from err


class StableSeg(torch.nn.Module):
    """Zero-shot segmenter on any diffusion backbone (loaded).

    Args:
        backbone: a loaded :class:`DiffusionBackbone`.
        resolution: square input side.
        cross_scales: map sides of the image-to-text sites averaged into CAPM ("all" = every one).
        self_scales: map sides of the image-to-image sites SAR uses.
        stored_cross_scales: map sides of the class maps returned for storage (stage 2 learns their weights).
        stored_cross_depths: only the stored sites at these depths (MM-DiT blocks); None = every depth.
        mode: ``ca`` (CAPM), ``sa`` (SAR) or ``ca+sa`` (their sum).
        background: ``threshold`` (constant channel), ``word`` (a map for ``background_word``) or ``none``.
        cross_depths: only the image-to-text sites at these depths (MM-DiT blocks, e.g. [9] for Seg4Diff's grounding
            block of SD3 Medium); None = every depth. Combined with ``cross_scales``.
        self_depths: only the image-to-image sites at these depths; None = every depth.
        site_weights: map id -> weight of its map in CAPM (learned by stage 2): a site id (its head-mean map) or a
            site's head (:func:`~stableseg_pp.backbones.base.head_map_id`); default uniform over the selected sites.
        store_head_maps: also return every stored site's per-head class maps (``cross_maps`` keyed by head map id).
        max_classes_per_prompt: at most this many class names in one prompt (None: as many as fit). Longer class
            lists (e.g. ``data.labels=all`` on ADE20K) are split over several prompts, one forward each.
    """

    def __init__(
        self,
        backbone: DiffusionBackbone,
        resolution: int = 512,
        cross_scales: Sequence[int] | str = (8, 16),
        self_scales: Sequence[int] | str = "all",
        stored_cross_scales: Sequence[int] | str = "all",
        mode: str = "ca+sa",
        background: str = "threshold",
        background_threshold: float = 0.55,
        background_word: str = "background",
        prompt_template: str = "a photo of a {}",
        joiner: str = " and ",
        site_weights: Mapping[str, float] | None = None,
        max_classes_per_prompt: int | None = None,
        cross_depths: Sequence[int] | None = None,
        self_depths: Sequence[int] | None = None,
        store_head_maps: bool = False,
        stored_cross_depths: Sequence[int] | None = None,
    ):
        super().__init__()
        check_settings(
            resolution=resolution, cross_scales=cross_scales, self_scales=self_scales,
            stored_cross_scales=stored_cross_scales, cross_depths=cross_depths, self_depths=self_depths,
            stored_cross_depths=stored_cross_depths, mode=mode, background=background, prompt_template=prompt_template,
            joiner=joiner,
        )  # fmt: skip
        self.backbone = backbone
        # registered as submodules so that .to(device) and Lightning move them
        self.parts = torch.nn.ModuleDict(backbone.modules())
        self.resolution = resolution
        self.mode = mode
        self.background = BackgroundRule(background, background_threshold, background_word)
        self.prompt_template = prompt_template
        self.joiner = joiner
        self.latent_grid = backbone.latent_grid(resolution)
        sites = backbone.sites(resolution)
        self.aggregated_sites = select_sites(
            sites, "text", cross_scales, cross_depths, "zero_shot.cross_scales", "zero_shot.cross_depths"
        )
        stored = select_sites(
            sites, "text", stored_cross_scales, stored_cross_depths, "zero_shot.stored_cross_scales",
            "zero_shot.stored_cross_depths",
        )  # fmt: skip
        self.cross_sites: list[AttentionSite] = [s for s in sites if s in stored or s in self.aggregated_sites]
        self.self_sites = (
            select_sites(sites, "image", self_scales, self_depths, "zero_shot.self_scales", "zero_shot.self_depths")
            if mode != "ca"
            else []
        )
        self.site_weights = dict(site_weights) if site_weights else {s.id: 1.0 for s in self.aggregated_sites}
        head_sites = check_map_ids(self.site_weights, self.cross_sites)
        if store_head_maps:
            head_sites |= {s.id for s in self.cross_sites}
        self.max_classes_per_prompt = max_classes_per_prompt
        self._groups: dict[tuple[str, ...], list[list[int]]] = {}
        self.store = AttentionStore()
        self.capture = CaptureRequest(
            class_maps=tuple(s.id for s in self.cross_sites),
            query_keys=tuple(s.id for s in self.self_sites),
            head_maps=tuple(s.id for s in self.cross_sites if s.id in head_sites),
        )
        backbone.install_capture(self.capture, self.store)

    def class_names_for_prompt(self, names: Sequence[str]) -> list[str]:
        return self.background.prompt_names(names)

    def prompt_groups(self, names: Sequence[str]) -> list[list[int]]:
        """Indices of ``names`` split into consecutive groups whose prompts fit the text encoder (and hold at most
        ``max_classes_per_prompt`` names): one group, one forward, unless the class list is too long for one prompt."""
        key = tuple(names)
        if key not in self._groups:
            self._groups[key] = split_into_prompts(
                self.backbone, names, self.prompt_template, self.joiner, self.max_classes_per_prompt
            )
        return self._groups[key]

    @torch.no_grad()
    def forward(
        self,
        pixels: torch.Tensor,
        class_names: Sequence[Sequence[str]],
        generator: Generators = None,
        class_weights: torch.Tensor | None = None,
    ) -> StableSegOutput:
        """StableSeg's scores for each image's named classes. ``class_weights`` (B, K): a labeler's confidence in
        each named class, deciding between classes that claim the same pixel (:func:`weigh_classes`); None: all
        alike, as in the paper."""
        if pixels.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"expected images of {self.resolution}x{self.resolution}, got {tuple(pixels.shape[-2:])}")
        backbone = self.backbone
        prompt_names = [self.class_names_for_prompt(n) for n in class_names]
        groups = [self.prompt_groups(n) for n in prompt_names]
        latents, time = backbone.noise(backbone.encode_images(pixels), generator)
        backbone.install_capture(self.capture, self.store)  # again, if another user of the backbone replaced them
        if all(len(g) == 1 for g in groups):  # every image's classes in one prompt: one forward per image
            text = backbone.encode_text(prompt_names, self.prompt_template, self.joiner)
            valid = text.valid
            self.store.reset(text.token_weights, self.latent_grid)
            backbone.denoise(latents, time, text)
        else:
            valid = self._forward_prompt_groups(latents, time, prompt_names, groups)
        size = (self.resolution, self.resolution)
        cross = self.store.class_maps()
        class_maps = minmax_normalize(aggregate_maps(cross, self.site_weights, size))
        if self.background.kind == "word":
            # the word is the last valid channel of each image: move it to channel 0
            n_valid = valid.sum(dim=1)
            capm = self._background_word_first(class_maps, n_valid)
            # channel 0 = the word, 1..n-1 = the classes: the same count of valid channels
            valid = torch.arange(valid.shape[1], device=valid.device)[None] < n_valid[:, None]
        else:  # threshold; "none": the channel is there but can never win
            capm = self.background.prepend(class_maps)
            valid = torch.cat([torch.full_like(valid[:, :1], self.background.kind != "none"), valid], dim=1)
        capm = capm.masked_fill(~valid[:, :, None, None], 0.0)
        if class_weights is not None:
            capm = weigh_classes(capm, class_weights.to(capm))
        scores = capm
        if self.mode != "ca":
            ca_labels = capm.masked_fill(~valid[:, :, None, None], float("-inf")).argmax(dim=1)
            qk = ((q, k, self.store.map_shape(q.shape[2])) for q, k in self.store.self_qk.values())
            sapm = sar_probabilities(qk, ca_labels, valid, size)
            scores = sapm if self.mode == "sa" else capm + sapm
        self.store.self_qk.clear()
        return StableSegOutput(scores=scores, valid=valid, capm=capm, cross_maps=cross)

    def _forward_prompt_groups(
        self, latents: torch.Tensor, time: torch.Tensor, names: list[list[str]], groups: list[list[list[int]]]
    ) -> torch.Tensor:
        """Class lists too long for one prompt: one forward per (image, group) in one batch; each image's class maps
        are its groups' maps in order (each class map is min-max normalised on its own afterwards), its Query/Key
        features those of its first group. Fills the store as a single forward would; returns (B, K) validity."""
        backbone, store = self.backbone, self.store
        image_of = [i for i, image_groups in enumerate(groups) for _ in image_groups]
        entries = [[names[i][j] for j in group] for i, image_groups in enumerate(groups) for group in image_groups]
        text = backbone.encode_text(entries, self.prompt_template, self.joiner)
        index = torch.tensor(image_of, device=latents.device)
        store.reset(text.token_weights, self.latent_grid)
        backbone.denoise(latents[index], time[index], text)
        k = max(len(n) for n in names)
        first = torch.tensor([image_of.index(i) for i in range(len(names))], device=latents.device)

        def regroup(maps: torch.Tensor) -> torch.Tensor:  # (entries, ..., K_group, h, w) -> (B, ..., K, h, w)
            out = maps.new_zeros((len(names), *maps.shape[1:-3], k, *maps.shape[-2:]))
            e = 0
            for i, image_groups in enumerate(groups):
                c = 0
                for group in image_groups:
                    out[i, ..., c : c + len(group), :, :] = maps[e, ..., : len(group), :, :]
                    c += len(group)
                    e += 1
            return out

        for per_site in (store.cross, store.cross_heads):
            for site, maps in list(per_site.items()):
                per_site[site] = regroup(maps)
        for site, (q, kk) in list(store.self_qk.items()):
            store.self_qk[site] = (q[first], kk[first])
        counts = torch.tensor([len(n) for n in names], device=latents.device)
        return torch.arange(k, device=latents.device)[None] < counts[:, None]

    @staticmethod
    def _background_word_first(class_maps: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
        """Reorder channels so that each image's background-word map (its last valid one) comes first."""
        out = torch.zeros_like(class_maps)
        for i, n in enumerate(n_valid.tolist()):
            out[i, 0] = class_maps[i, n - 1]
            out[i, 1:n] = class_maps[i, : n - 1]
        return out


def weigh_classes(capm: torch.Tensor, weights: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B, 1 + C, R, R) maps, background first -> the same with the classes' competition decided by ``weights``
    (B, C): at each pixel the classes' maps are multiplied by their weights and rescaled so that the strongest class
    keeps the unweighted maximum. Which pixels are background does not change; where two classes both claim a pixel,
    the one the labeler is surer of wins. Equal weights change nothing."""
    classes = capm[:, 1:]
    weighted = classes * weights[:, :, None, None]
    scale = classes.amax(1, keepdim=True) / weighted.amax(1, keepdim=True).clamp_min(eps)
    return torch.cat([capm[:, :1], weighted * scale], dim=1)


def check_map_ids(weights: Mapping[str, float], sites: Sequence[AttentionSite]) -> set[str]:
    """Every weighted map must be captured: a site among ``sites`` (and a head it has). Returns the sites whose
    heads are weighted one by one."""
    by_id = {s.id: s for s in sites}
    unknown, head_sites = [], set()
    for map_id in weights:
        site, head = parse_map_id(map_id)
        if site not in by_id or (head is not None and head >= by_id[site].heads):
            unknown.append(map_id)
        elif head is not None:
            head_sites.add(site)
    if unknown:
        raise ConfigError(f"site weights name sites that are not captured: {sorted(unknown)}")
    return head_sites


def split_into_prompts(
    backbone: DiffusionBackbone, names: Sequence[str], template: str, joiner: str, max_per_prompt: int | None = None
) -> list[list[int]]:
    """Consecutive groups of ``names`` (as indices), each as long as fits one prompt (and ``max_per_prompt``).

    A name that does not fit a prompt even alone is the backbone's clear ``PromptTooLongError``.
    """
    groups: list[list[int]] = []
    current: list[int] = []
    for i in range(len(names)):
        trial = [*current, i]
        if max_per_prompt is None or len(trial) <= max_per_prompt:
            try:
                backbone.check_prompt([names[j] for j in trial], template, joiner)
                current = trial
                continue
            except PromptTooLongError:
                if not current:
                    raise
        groups.append(current)
        backbone.check_prompt([names[i]], template, joiner)
        current = [i]
    return [*groups, current] if current else groups


def resize_scores(scores: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, K, h, w) scores to an image's original size."""
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
