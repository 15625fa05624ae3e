"""Train the miniature text-to-image latent diffusion model of the built-in world.

    python -m stableseg_pp.miniature_sd.train --out stableseg_pp/assets/miniature_sd

1. Train a small ``AutoencoderKL`` (4x downsampling) on miniature images.
2. Train a ``UNet2DConditionModel`` jointly with a small ``CLIPTextModel`` on
   captions that name the classes (DDPM epsilon loss, SD 1.x noise schedule).
   A margin penalty keeps the class-word embeddings apart: without it the
   jointly trained text encoder can collapse so that every class token looks
   the same and attention maps only separate object from background.
3. Check the result: it must bind words to shapes (StableSeg's cross-attention
   class accuracy on ground-truth foreground pixels at least chance + margin)
   and its class-token embeddings must not have collapsed. Otherwise the next
   seed is tried, and the log says so.
4. Save the pipeline with ``save_pretrained`` (diffusers layout) and a model card.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m stableseg_pp.miniature_sd.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("stableseg_pp/assets/miniature_sd"))
    p.add_argument("--images", type=int, default=6000, help="training images (seed stream 'diffusion')")
    p.add_argument("--vae-steps", type=int, default=500)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=1200, help="U-Net + text encoder steps per seed")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--text-lr", type=float, default=5e-4)
    p.add_argument("--margin", type=float, default=0.3, help="cosine above which class embeddings are pushed apart")
    p.add_argument("--margin-weight", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--check-images", type=int, default=96)
    p.add_argument("--eval-every", type=int, default=400, help="steps between checks; the best checkpoint is kept")
    p.add_argument("--min-miou", type=float, default=0.45, help="required stage-0 mIoU on the check stream")
    p.add_argument("--min-gain", type=float, default=0.2, help="required class accuracy above chance")
    p.add_argument("--max-cosine", type=float, default=0.8, help="collapse limit for class-token embeddings")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    from stableseg_pp.miniature_sd.training import run  # torch and diffusers load after the arguments are parsed

    run(args)


if __name__ == "__main__":
    main()
