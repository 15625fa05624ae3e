"""Benchmark: stage 0 against the speed of the bare diffusion forward, on the same batches, in one process.

  (a) bare   the backbone's image encode + text encode + denoiser forward, stock attention processors;
  (b) stage0 the full stage-0 predict loop (Lightning's predict, StableSeg's capture, CAPM + SAR, the batched
             post-processing and transfer, the writer threads writing npz maps and PNG masks into a temporary folder).

Prints images/s of both and b/a per batch size, and per batch the device-to-host copies made by the main thread
(``Tensor.cpu`` / ``Tensor.numpy`` calls in the predict step and the writer's batch hook) and the file encodes it did
itself (npz, PNG). The model's loading is outside the timing.

On a CPU: the shipped miniature model on the miniature world's val images (64 px). With ``--model sd15`` (the default
with ``--device cuda``): an SD 1.5-shaped pipeline built from its configuration with random weights (no download),
512x512, float16, the miniature images upsampled.
"""

from __future__ import annotations

import argparse
import inspect
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

COUNTS: Counter = Counter()
IN_STEP = threading.local()  # set while the main thread is in the predict step or the writer's batch hook


def _count_main_thread(name: str, fn):
    def wrapped(*args, **kwargs):
        if threading.current_thread() is threading.main_thread() and getattr(IN_STEP, "on", False):
            COUNTS[name] += 1
        return fn(*args, **kwargs)

    return wrapped


def _in_step(fn):
    def wrapped(*args, **kwargs):
        IN_STEP.on = True
        try:
            return fn(*args, **kwargs)
        finally:
            IN_STEP.on = False

    return wrapped


def instrument(module_class, writer_class) -> None:
    """Count what the main thread does per batch (in the predict step and the writer's batch hook): device-to-host
    copies and file encodes."""
    torch.Tensor.cpu = _count_main_thread("cpu", torch.Tensor.cpu)
    torch.Tensor.numpy = _count_main_thread("numpy", torch.Tensor.numpy)
    np.savez_compressed = _count_main_thread("npz", np.savez_compressed)
    Image.Image.save = _count_main_thread("png", Image.Image.save)
    module_class.predict_step = _in_step(module_class.predict_step)
    writer_class.write_on_batch_end = _in_step(writer_class.write_on_batch_end)


def sd15_backbone(dtype: str):
    """SD 1.5's VAE, U-Net and CLIP ViT-L/14 text encoder from their configurations, random weights; the miniature
    tokenizer (its ids are valid CLIP ids)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from stableseg_pp.backbones.sd_unet import SDUNetBackbone
    from stableseg_pp.bench.capture import SD15_UNET
    from stableseg_pp.miniature_sd.architecture import build_tokenizer

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
        scaling_factor=0.18215,
    )  # fmt: skip
    unet = UNet2DConditionModel(**SD15_UNET)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77))  # fmt: skip
    tok = build_tokenizer(Path(tempfile.mkdtemp(prefix="bench_tok_")))
    parts = [m.eval().requires_grad_(False).to(dtype=getattr(torch, dtype)) for m in (vae, unet, text)]
    return SDUNetBackbone.from_components(*parts, tok, DDPMScheduler(), name="sd15_random", dtype=dtype)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m stableseg_pp.bench stage0", description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=["miniature", "sd15"], default=None, help="default: sd15 on cuda, else miniature")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default: 16 (cpu), 1 16 32 (cuda)")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--writer-threads", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    from lightning import Trainer
    from torch.utils.data import DataLoader

    from stableseg_pp.artifacts import MaskSetLayout, MaskSetWriter
    from stableseg_pp.config import build, compose_config
    from stableseg_pp.data.description import describe_dataset
    from stableseg_pp.data.prompted_images import collate_samples
    from stableseg_pp.models.zero_shot_module import ZeroShotSegmenter
    from stableseg_pp.stages.stage0 import build_stableseg

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model = args.model or ("sd15" if cuda else "miniature")
    batches = args.batch or ([1, 16, 32] if cuda else [16])
    root = Path(tempfile.mkdtemp(prefix="bench_stage0_"))
    overrides = [f"paths.root_dir={root}", f"data.limit={args.images}"]
    if model == "sd15":
        overrides += ["zero_shot.resolution=512", "zero_shot.cross_scales=[8,16]"]
    cfg = compose_config(overrides)
    dataset = describe_dataset(cfg.data, ["val"])
    ids = dataset.split_ids("val")
    backbone = sd15_backbone("float16" if cuda else "float32") if model == "sd15" else build(cfg.diffusion, _convert_="all")
    module = ZeroShotSegmenter(backbone, dataset, stableseg=build_stableseg(cfg, dataset))
    module.configure_model()
    module.to(args.device)
    instrument(ZeroShotSegmenter, MaskSetWriter)
    images = dataset.prompted_images("val", ids, module.resolution)
    template, joiner = cfg.zero_shot.prompt_template, cfg.zero_shot.joiner

    def bare(samples):
        backbone.remove_capture()  # stock processors
        for group in samples:
            group = [s for s in group if s.class_ids]
            with torch.no_grad():
                pixels = torch.stack([s.pixels for s in group]).to(args.device)
                text = backbone.encode_text([[dataset.prompt_name(c) for c in s.class_ids] for s in group], template, joiner)
                latents, t = backbone.noise(backbone.encode_images(pixels))
                backbone.denoise(latents, t, text)
        if cuda:
            torch.cuda.synchronize()

    def full(samples, out: Path):
        threaded = "threads" in inspect.signature(MaskSetWriter).parameters  # (the code before the writer pool had none)
        extra = {"threads": args.writer_threads} if threaded else {}
        writer = MaskSetWriter([MaskSetLayout(out)], ids[:8], dataset.palette, dataset.background_index, **extra)
        trainer = Trainer(accelerator="gpu" if cuda else "cpu", devices=1, logger=False, callbacks=[writer],
                          enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        loader = DataLoader(samples, batch_size=None, collate_fn=lambda b: b, pin_memory=cuda)
        trainer.predict(module, dataloaders=loader, return_predictions=False)
        if cuda:
            torch.cuda.synchronize()

    results = {}
    for batch in batches:
        samples = [collate_samples([images[i] for i in range(s, min(s + batch, len(ids)))]) for s in range(0, len(ids), batch)]
        bare(samples)  # warm-up (kernels, allocator)
        start = time.perf_counter()
        bare(samples)
        a = len(ids) / (time.perf_counter() - start)
        full(samples, root / "warmup")
        COUNTS.clear()
        start = time.perf_counter()
        full(samples, root / f"batch{batch}")
        b = len(ids) / (time.perf_counter() - start)
        per_batch = {k: v / len(samples) for k, v in COUNTS.items()}
        results[batch] = {"bare_images_per_s": a, "stage0_images_per_s": b, "ratio": b / a, "main_thread_per_batch": per_batch}
        print(f"{model}, {args.device}, batch {batch}, {len(ids)} images: (a) bare {a:.1f} img/s, (b) stage 0 {b:.1f} img/s, "
              f"b/a {b / a:.2f}; main thread per batch: {per_batch.get('cpu', 0):.1f} .cpu() and {per_batch.get('numpy', 0):.1f} "
              f".numpy() calls (device-to-host copies on a GPU), "
              f"{per_batch.get('npz', 0):.1f} npz + {per_batch.get('png', 0):.1f} PNG encodes", flush=True)  # fmt: skip
    return results
