"""Train the miniature FLUX model (FLUX.1 [schnell]-style) of the built-in world with flow matching.

    python -m stableseg_pp.miniature_flux.train --out stableseg_pp/assets/miniature_flux

1. Take the miniature U-Net model's trained VAE, and give it the ``shift_factor``
   and ``scaling_factor`` of the training latents (as the miniature MM-DiT does).
2. Train a ``FluxTransformer2DModel`` (double- then single-stream blocks) jointly
   with a small T5 encoder (the text tokens) and a small CLIP text encoder (the
   pooled vector) on captions naming the classes, with the flow-matching
   objective of the miniature MM-DiT (``x_t = (1 - s) x0 + s eps``, target
   ``eps - x0``, ``compute_density_for_timestep_sampling``) on 2x2-packed latents,
   called through ``FluxBackbone.encode_prompts`` / ``denoise`` exactly as
   ``FluxPipeline`` calls the transformer (``timestep / 1000``, zero ``txt_ids``,
   the token grid's ``img_ids``). A margin penalty keeps the T5 class vectors
   apart; the pooled CLIP vector is zeroed for most samples, so that the image
   tokens must attend to the T5 class tokens.
3. Keep the checkpoint whose attention segments the held-out ``check`` stream
   best (all blocks, the double-stream or the single-stream blocks together, or
   one block; clean or flow-noised); require it to bind words to shapes, else try
   the next seed (while ``--max-minutes`` allows another).
4. Save with ``FluxPipeline.save_pretrained``, a model card and ``training_log.json``
   (written beside the target and renamed into place).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m stableseg_pp.miniature_flux.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("stableseg_pp/assets/miniature_flux"))
    p.add_argument("--images", type=int, default=6000, help="training images (seed stream 'diffusion')")
    p.add_argument("--steps", type=int, default=3000, help="transformer + text encoder steps per seed")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--double", type=int, default=3, help="double-stream blocks")
    p.add_argument("--single", type=int, default=2, help="single-stream blocks")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=24)
    p.add_argument("--rope", type=int, nargs=3, default=[8, 8, 8], help="RoPE axes dims (sum: the head dim)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--text-lr", type=float, default=5e-4)
    p.add_argument("--weighting-scheme", default="logit_normal", choices=["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
    p.add_argument("--pooled-dropout", type=float, default=0.8, help="share of samples without the pooled text vector")
    p.add_argument("--margin", type=float, default=0.3, help="cosine above which T5 class vectors are pushed apart")
    p.add_argument("--margin-weight", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--max-minutes", type=float, default=30.0, help="no further seed is started past this budget")
    p.add_argument("--check-images", type=int, default=96)
    p.add_argument("--eval-every", type=int, default=500, help="steps between checks; the best checkpoint is kept")
    p.add_argument("--min-miou", type=float, default=0.3, help="required stage-0 mIoU on the check stream")
    p.add_argument("--min-gain", type=float, default=0.15, help="required class accuracy above chance")
    p.add_argument("--keep-unbound", action="store_true", help="if no seed binds, save the best try anyway")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    from stableseg_pp.miniature_flux.training import run  # torch and diffusers load after the arguments are parsed

    run(args)


if __name__ == "__main__":
    main()
