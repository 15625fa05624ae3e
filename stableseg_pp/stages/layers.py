"""The grounding-expert analysis: how well each attention site, and each of its heads, segments on its own.

Reads stage 0's stored class maps (one diffusion forward per image captured
every site and head; ``zero_shot.store_head_maps=true``) and scores, for every
map alone, the cross-attention mask stage 0 would make from it (upsampled,
min-max normalised, background threshold, argmax) against the ground truth of
the split, under the dataset's protocol. Also scored: the mean over all sites
and the mean over the sites stage 0 aggregates (``zero_shot.cross_scales`` /
``cross_depths``). Writes ``layers.md``, ``layers.json`` and ``heatmap.png``
(site x head, colour = mIoU), and names the best site: the grounding expert.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from stableseg_pp.artifacts import ChannelClasses, MaskSetLayout, load_stored_maps
from stableseg_pp.backbones.base import AttentionSite, parse_map_id, select_sites
from stableseg_pp.data.description import DatasetDescription
from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.evaluation.mask_sets import ground_truth, protocol_result
from stableseg_pp.evaluation.miou import scores_from_confusion
from stableseg_pp.evaluation.site_plots import plot_site_heads
from stableseg_pp.methods.background import BackgroundRule, background_rule
from stableseg_pp.methods.capm import aggregate_maps, minmax_normalize
from stableseg_pp.runtime import distributed
from stableseg_pp.runtime.atomic import atomic_write_text, write_json
from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.runtime.run_dir import write_record
from stableseg_pp.stages.step import Step, build_backbone
from stableseg_pp.tracking.base import StepRecord

log = logging.getLogger(__name__)
STEP = Step("layers")
ALL_SITES = "mean of all sites"
SELECTED_SITES = "mean of stage 0's sites"
CHUNK = 16  # maps scored at once (bounds the memory of the upsampled maps)


class MapScorer:
    """Confusion matrices of the CA masks of many candidate maps (or weighted means of maps) over a split.

    Args:
        n_classes: the dataset's number of classes.
        resolution: stage 0's square input side (maps are upsampled to it, as stage 0 does, then to the image).
        background: stage 0's background rule (a constant channel: ``threshold``, or ``none`` without a background
            class).
        background_index: the dataset's background class (None: none).
    """

    def __init__(self, n_classes: int, resolution: int, background: BackgroundRule, background_index: int | None):
        background.require_constant("the layer analysis scores each map")
        self.n_classes = n_classes
        self.resolution = resolution
        self.background = background
        self.background_index = background_index
        self.confusion: dict[str, torch.Tensor] = {}
        self.empty = torch.zeros(n_classes, n_classes, dtype=torch.long)  # images with nothing prompted: every candidate

    def _scores(self, maps: torch.Tensor) -> torch.Tensor:
        """(M, C, R, R) class maps at the input resolution -> (M, 1 + C, R, R) scores as stage 0 makes them."""
        return self.background.prepend(minmax_normalize(maps))

    def _count(self, names: Sequence[str], scores: torch.Tensor, gt: torch.Tensor, channels: ChannelClasses) -> torch.Tensor:
        scores = F.interpolate(scores, size=tuple(gt.shape), mode="bilinear", align_corners=False)
        lut = torch.from_numpy(channels.channel_to_class().astype(np.int64))
        pred = lut[scores.argmax(dim=1)]  # (M, H, W) dataset class ids
        pred = torch.where(pred == IGNORE_INDEX, torch.zeros_like(pred), pred)  # as SegmentationMetrics counts it
        keep = gt != IGNORE_INDEX
        k = self.n_classes
        index = gt[keep].long() * k + pred[:, keep]
        counts = torch.bincount((index + torch.arange(len(names))[:, None] * k * k).flatten(), minlength=len(names) * k * k)
        counts = counts.view(len(names), k, k)
        for name, cm in zip(names, counts, strict=True):
            self.confusion[name] = self.confusion.get(name, 0) + cm
        return counts

    def add_image(
        self,
        maps: Mapping[str, np.ndarray],
        means: Mapping[str, Mapping[str, float]],
        class_ids: Sequence[int],
        gt: np.ndarray,
    ) -> None:
        """Score every map of ``maps`` (map id -> (C, h, w)) alone, and each weighted mean of ``means``."""
        target = torch.from_numpy(gt.astype(np.int64))
        channels = ChannelClasses(tuple(class_ids), self.background_index)
        size = (self.resolution, self.resolution)
        tensors = {n: torch.from_numpy(m.astype(np.float32)) for n, m in maps.items()}
        if not class_ids:  # nothing prompted (no maps stored): every candidate predicts the empty label
            self.empty += self._count(["(nothing prompted)"], torch.zeros(1, 1, *size), target, channels)[0]
            del self.confusion["(nothing prompted)"]
            return
        names = list(tensors)
        for start in range(0, len(names), CHUNK):
            chunk = names[start : start + CHUNK]
            up = torch.stack([F.interpolate(tensors[n][None], size=size, mode="bilinear", align_corners=False)[0] for n in chunk])
            self._count(chunk, self._scores(up), target, channels)
        for name, weights in means.items():
            agg = aggregate_maps({n: t[None] for n, t in tensors.items()}, weights, size)
            self._count([name], self._scores(agg), target, channels)

    def results(self, class_names: Sequence[str]) -> dict[str, dict]:
        return {n: scores_from_confusion(cm + self.empty, class_names, self.background_index) for n, cm in self.confusion.items()}


def analysis_table(
    sites: Sequence[AttentionSite], miou: Mapping[str, float], means: Mapping[str, float]
) -> tuple[list[dict], dict]:
    """Rows (one per stored site, forward order: its mIoU alone and each head's) and the summary (best site,
    best head, the means, whether the best site beats the all-site mean)."""
    rows = []
    for site in sites:
        if site.id not in miou:
            continue
        heads = [miou.get(f"{site.id}/head{h}") for h in range(site.heads)]
        rows.append({"site": site.id, "kind": site.kind, "depth": site.depth, "grid": list(site.grid), "miou": miou[site.id],
                     "heads": heads})  # fmt: skip
    if not rows:
        raise ConfigError("the stage-0 folder stores no class maps of this backbone's sites: run stage 0 again")
    best = max(rows, key=lambda r: r["miou"])
    head_scores = {f"{r['site']}/head{h}": v for r in rows for h, v in enumerate(r["heads"]) if v is not None}
    best_head = max(head_scores, key=head_scores.get) if head_scores else None
    summary = {
        "best_site": best["site"],
        "best_site_miou": best["miou"],
        "best_head": best_head,
        "best_head_miou": head_scores.get(best_head) if best_head else None,
        "means": dict(means),
        "best_site_beats_all_site_mean": best["miou"] > means[ALL_SITES] if ALL_SITES in means else None,
    }
    return rows, summary


def markdown(rows: list[dict], summary: dict, header: str) -> str:
    heads = max(len(r["heads"]) for r in rows)
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [
        header,
        "",
        "| depth | site | kind | grid | mIoU (head mean) | " + " | ".join(f"head {h}" for h in range(heads)) + " |",
    ]
    lines.append("| --- " * (5 + heads) + "|")
    for r in rows:
        cells = [pct(v) for v in r["heads"]] + ["-"] * (heads - len(r["heads"]))
        star = " **(expert)**" if r["site"] == summary["best_site"] else ""
        lines.append(
            f"| {r['depth']} | `{r['site']}`{star} | {r['kind']} | {r['grid'][0]}x{r['grid'][1]} | {pct(r['miou'])} | "
            + " | ".join(cells) + " |"
        )  # fmt: skip
    lines += ["", "| aggregate (cross-attention only, no SAR) | mIoU |", "| --- | --- |"]
    lines += [f"| {name} | {pct(v)} |" for name, v in summary["means"].items()]
    lines += [
        "",
        f"Grounding expert: `{summary['best_site']}` ({pct(summary['best_site_miou'])} mIoU alone).",
        f"Best head: `{summary['best_head']}` ({pct(summary['best_head_miou'])})." if summary["best_head"] else "",
    ]
    if summary["best_site_beats_all_site_mean"] is not None:
        verdict = "beats" if summary["best_site_beats_all_site_mean"] else "does not beat"
        lines.append(f"The best single site {verdict} the mean of all sites ({pct(summary['means'][ALL_SITES])}).")
    return "\n".join(lines).rstrip() + "\n"


def run(cfg: DictConfig, dataset: DatasetDescription, stage0_dir: Path) -> Path:
    split = str(cfg.analyze.split)
    key = {
        "maps": stage0_dir.name,
        "split": split,
        "threshold": scoring_rule(cfg, dataset).constant,
        "resolution": cfg.zero_shot.resolution,
        "selection": {k: cfg.zero_shot.get(k) for k in ("cross_scales", "cross_depths")},
    }

    def compute(out: Path, key: dict, record: StepRecord) -> None:
        # rank 0 scores the stored maps (no diffusion forward); the others wait
        distributed.on_main(lambda: _analyse(cfg, dataset, stage0_dir, split, out, key, record))
        distributed.barrier()

    return STEP.run(cfg, key, [stage0_dir], compute)


def scoring_rule(cfg: DictConfig, dataset: DatasetDescription) -> BackgroundRule:
    """Stage 0's background rule, as each stored map is scored. ``word`` (the SD3 presets) makes the word's map the
    background, but stage 0 stores the class maps only: the maps are scored against ``background_threshold`` instead,
    and the analysis says so (the site ranking compares maps under one rule; its absolute mIoU is not stage 0's)."""
    rule = background_rule(cfg.zero_shot, dataset.has_background)
    if rule.kind != "word":
        return rule
    log.warning(
        "zero_shot.background=word: the word's map is not stored, so each map is scored against a constant "
        "background of %s (zero_shot.background_threshold); the ranking holds, the absolute mIoU is not stage 0's",
        rule.threshold,
    )
    return BackgroundRule("threshold", rule.threshold)


def _analyse(cfg, dataset: DatasetDescription, stage0_dir: Path, split: str, out: Path, key: dict, record) -> None:
    zs = cfg.zero_shot
    sites = build_backbone(cfg).sites(zs.resolution)
    selected = select_sites(sites, "text", zs.cross_scales, zs.get("cross_depths"))
    layout = MaskSetLayout(stage0_dir / split)
    scorer = MapScorer(len(dataset.class_names), zs.resolution, scoring_rule(cfg, dataset), dataset.background_index)
    images = 0
    for sid in dataset.split_ids(split):
        if not layout.maps_path(sid).exists() or (gt := ground_truth(dataset, split, sid)) is None:
            continue
        stored = load_stored_maps(layout.maps_path(sid))
        site_ids = [n for n in stored.site_maps if parse_map_id(n)[1] is None]
        means = {ALL_SITES: dict.fromkeys(site_ids, 1.0), SELECTED_SITES: {s.id: 1.0 for s in selected if s.id in site_ids}}
        scorer.add_image(stored.site_maps, means, stored.class_ids, gt)
        images += 1
    if images == 0:
        raise ConfigError(f"{layout.root}: no image of the {split} split has stored maps and ground truth to score")
    results = {n: protocol_result(dataset, split, r, images) for n, r in scorer.results(dataset.class_names).items()}
    miou = {n: r["miou"] for n, r in results.items()}
    rows, summary = analysis_table(sites, miou, {n: miou[n] for n in (ALL_SITES, SELECTED_SITES)})
    stage0 = json.loads((stage0_dir / "metrics.json").read_text()).get(split) if (stage0_dir / "metrics.json").exists() else None
    summary["stage0_miou"] = stage0["miou"] if stage0 else None
    header = (
        f"# Attention sites of `{cfg.diffusion.name}` on {dataset.name} {split} ({images} images, "
        f"{dataset.protocol(split)['background']} background), each map alone as a cross-attention mask"
    )
    if summary["stage0_miou"] is not None:
        header += f"\n\nStage 0 with its own settings (aggregate + SAR): {100 * summary['stage0_miou']:.1f} mIoU."
    atomic_write_text(out / "layers.md", markdown(rows, summary, header))
    write_json(out / "layers.json", {"split": split, "images": images, "sites": rows, **summary,
                                     "protocol": dataset.protocol(split)})  # fmt: skip
    per_head = {f"{r['site']}/head{h}": 100 * v for r in rows for h, v in enumerate(r["heads"]) if v is not None}
    if per_head:
        title = f"each head alone: {cfg.diffusion.name}, {dataset.name} {split}"
        site_miou = {r["site"]: 100 * r["miou"] for r in rows}
        plot_site_heads(per_head, out / "heatmap.png", "mIoU (%)", title, "{:.0f}", site_miou)
    log.info("layers: grounding expert %s (%.3f mIoU alone); all-site mean %.3f; best head %s",
             summary["best_site"], summary["best_site_miou"], miou[ALL_SITES], summary["best_head"])  # fmt: skip
    write_record(out, key, images=images, best_site=summary["best_site"], best_head=summary["best_head"])
    record.log_table("layers", [{k: v for k, v in r.items() if k != "heads"} | {"heads": json.dumps(r["heads"])} for r in rows])
    if per_head:
        record.log_image("layers_heatmap", out / "heatmap.png")
    record.log_metrics({"layers/best_site_miou": summary["best_site_miou"], "layers/all_site_mean_miou": miou[ALL_SITES]})
