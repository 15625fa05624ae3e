"""Trivial baselines that stage 0's mIoU must beat (background included).

* all background: every pixel predicted as background;
* oracle foreground + random class: the ground-truth foreground/background split,
  with each foreground pixel given a random class among those present in the image.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from stableseg_pp.data.layouts import VOCLayout
from stableseg_pp.data.miniature import CLASS_NAMES, write_miniature_voc
from stableseg_pp.data.palette import IGNORE_INDEX
from stableseg_pp.data.prompted_images import PromptedImages
from stableseg_pp.evaluation.miou import SegmentationMetrics


def baselines(root, split: str = "val", class_names=CLASS_NAMES, seed: int = 0) -> dict:
    ds = PromptedImages(VOCLayout(root), split, class_names, resolution=64)
    rng = np.random.default_rng(seed)
    all_bg = SegmentationMetrics(class_names)
    random_cls = SegmentationMetrics(class_names)
    for i in range(len(ds)):
        s = ds[i]
        gt = torch.from_numpy(s.mask)
        all_bg.update(torch.zeros_like(gt), gt)
        fg = (s.mask != 0) & (s.mask != IGNORE_INDEX)
        pred = np.zeros_like(s.mask)
        if s.class_ids:
            pred[fg] = rng.choice(s.class_ids, size=int(fg.sum()))
        random_cls.update(torch.from_numpy(pred), gt)
    return {
        "all_background": all_bg.compute()["miou"],
        "gt_foreground_random_present_class": random_cls.compute()["miou"],
        "images": len(ds),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m stableseg_pp.bench baselines", description=__doc__)
    p.add_argument("--root", default="data/miniature", help="a miniature world folder (written if missing)")
    p.add_argument("--split", default="val")
    args = p.parse_args(argv)
    write_miniature_voc(args.root)
    res = baselines(args.root, args.split)
    print(f"{args.split} split, {res['images']} images, mIoU with background:")
    print(f"  all background:                       {res['all_background']:.4f}")
    print(f"  GT foreground, random present class:  {res['gt_foreground_random_present_class']:.4f}")
    return res
