"""How the miniature model is trained, checked and saved (``python -m stableseg_pp.miniature_sd.train`` is the command)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stableseg_pp.backbones.prompts import map_class_tokens
from stableseg_pp.backbones.sd_unet import SDUNetBackbone
from stableseg_pp.data.miniature import CLASS_NAMES, draw_sample, sample_seed
from stableseg_pp.evaluation.miou import SegmentationMetrics
from stableseg_pp.methods.stableseg import StableSeg
from stableseg_pp.miniature_sd.architecture import (
    build_noise_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_images(split: str, n: int, seed: int = 0):
    """Images in [-1, 1] (N, 3, 64, 64), masks (N, 64, 64), captions and class ids."""
    samples = [draw_sample(sample_seed(split, i, seed)) for i in range(n)]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    masks = torch.from_numpy(np.stack([s.mask for s in samples]))
    return images, masks, [s.caption for s in samples], [s.classes for s in samples]


def train_vae(images: torch.Tensor, steps: int, batch: int, lr: float, kl_weight: float, seed: int):
    torch.manual_seed(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x = images[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    return vae


def class_token_embeddings(text_encoder, tokenizer, template: str = "a photo of a {}") -> torch.Tensor:
    """(n_classes, D) mean output embedding of each class name's tokens in its own prompt."""
    rows = []
    for name in CLASS_NAMES[1:]:
        m = map_class_tokens(tokenizer, [name], template)
        ids = torch.tensor([m.input_ids])
        out = text_encoder(ids)[0][0]
        rows.append(out[m.positions[0]].mean(0))
    return torch.stack(rows)


def max_pairwise_cosine(emb: torch.Tensor) -> torch.Tensor:
    e = F.normalize(emb, dim=-1)
    cos = e @ e.T
    off = cos[~torch.eye(len(e), dtype=torch.bool)]
    return off.max()


def train_denoiser(latent_mean, latent_std, captions, tokenizer, vae, args, seed: int):
    torch.manual_seed(seed)
    unet = build_unet()
    text_encoder = build_text_encoder(tokenizer)
    sched = build_noise_scheduler()
    params = [
        {"params": unet.parameters(), "lr": args.lr},
        {"params": text_encoder.parameters(), "lr": args.text_lr},
    ]
    opt = torch.optim.AdamW(params, weight_decay=1e-2)
    warmup = 100

    def lr_lambda(s):
        return min(1.0, (s + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)) * 0.9 + 0.1)  # noqa: E731

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    ids_all = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(seed)
    alphas = sched.alphas_cumprod
    best: dict | None = None
    history: list[dict] = []
    start = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(latent_mean), (args.batch,), generator=gen)
        x0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        emb = text_encoder(ids_all[idx])[0]
        pred = unet(xt, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, noise)
        sep = torch.zeros(())
        if args.margin_weight > 0:
            cos_max = F.normalize(class_token_embeddings(text_encoder, tokenizer), dim=-1)
            cos = cos_max @ cos_max.T
            off = cos[~torch.eye(len(cos), dtype=torch.bool)]
            sep = F.relu(off - args.margin).pow(2).mean()
        total = loss + args.margin_weight * sep
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text_encoder.parameters()), 1.0)
        opt.step()
        lr_sched.step()
        if step % 100 == 0 or step == args.steps:
            log(
                f"seed {seed} step {step}/{args.steps} eps-loss {loss.item():.4f} sep {sep.item():.4f} "
                f"({time.time() - start:.0f}s)"
            )
        if step % args.eval_every == 0 or step == args.steps:
            # Keep the checkpoint whose attention segments best on the held-out 'check' stream.
            unet.eval()
            text_encoder.eval()
            backbone = SDUNetBackbone.from_components(vae, unet, text_encoder, tokenizer, sched, name="miniature_sd")
            check = binding_check(backbone, args.check_images)
            backbone.remove_capture()
            history.append({"step": step, **check})
            log(f"seed {seed} step {step}: check mIoU {check['miou']:.3f}, foreground class accuracy {check['accuracy']:.3f}")
            if best is None or check["miou"] > best["check"]["miou"]:
                best = {
                    "step": step,
                    "check": check,
                    "unet": {k: v.clone() for k, v in unet.state_dict().items()},
                    "text": {k: v.clone() for k, v in text_encoder.state_dict().items()},
                }
            unet.train()
            text_encoder.train()
    unet.load_state_dict(best["unet"])
    text_encoder.load_state_dict(best["text"])
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return unet, text_encoder, sched, best["step"], history


@torch.no_grad()
def binding_check(backbone, n_images: int, seed: int = 0, **stableseg) -> dict:
    """Does the model bind class words to shapes? Class accuracy on foreground pixels.

    For every ground-truth foreground pixel, StableSeg's cross-attention (CA only)
    picks one of the classes present in the image; chance is 1 / (classes present).
    ``stableseg``: StableSeg settings (default: the 8x8 and 16x16 cross-attention maps).
    """
    settings = {"resolution": 64, "cross_scales": (8, 16), "mode": "ca", "background_threshold": 0.55} | stableseg
    seg = StableSeg(backbone, **settings)
    torch.manual_seed(seed)  # noised latents, where the backbone adds noise
    images, masks, _, classes = make_images("check", n_images, seed)
    metrics = SegmentationMetrics(CLASS_NAMES)
    correct = chance = total = 0.0
    for i in range(0, n_images, 16):
        names = [[CLASS_NAMES[c] for c in cls] for cls in classes[i : i + 16]]
        out = seg(images[i : i + 16], names)
        fg_scores = out.capm[:, 1:]
        for j, cls in enumerate(classes[i : i + 16]):
            gt = masks[i + j].long()
            pred_idx = fg_scores[j, : len(cls)].argmax(0)
            lut = torch.tensor(cls)
            pred = lut[pred_idx]
            metrics.update(torch.tensor([0, *cls])[out.labels[j]], gt)
            fg = (gt != 0) & (gt != 255)
            correct += (pred[fg] == gt[fg]).sum().item()
            chance += fg.sum().item() / len(cls)
            total += fg.sum().item()
    return {"accuracy": correct / total, "chance": chance / total, "miou": metrics.compute()["miou"]}


def save_pipeline(out: Path, vae, unet, text_encoder, tokenizer, noise_scheduler) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(noise_scheduler.config, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = Path(tempfile.mkdtemp(prefix=".miniature_sd.", dir=out.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


MODEL_CARD = """# Miniature Stable Diffusion (stableseg_pp built-in world)

A real latent text-to-image diffusion model, small enough for a laptop CPU, in
the diffusers folder layout: `AutoencoderKL` (4x downsampling, 4 latent
channels), `UNet2DConditionModel` (cross-attention at the 16x16 and 8x8 levels
and in the 4x4 mid block), `CLIPTextModel` and a `CLIPTokenizer` with a small
BPE vocabulary (BOS, EOS, padding to 77). It runs the same StableSeg code path
as Stable Diffusion 1.5.

## Data
The miniature world (`stableseg_pp.data.miniature`): 64x64 images of up to
three shapes ({classes}) with a typical colour per class, jitter and texture,
on textured backgrounds; captions `a photo of a <class> and <class>`. The
training images use the seed stream `diffusion`, disjoint from the train/val
splits that stage 0 is evaluated on. No masks are used for training.

## Training (this checkpoint)
{summary}

## Retrain
```
python -m stableseg_pp.miniature_sd.train --out stableseg_pp/assets/miniature_sd {argv}
```
"""


def write_training_log(args: argparse.Namespace, out_as_given: Path, tries: list[dict], seed: int, t0: float) -> dict:
    """``training_log.json`` beside the saved model (both miniature models): every seed tried and the chosen one."""
    summary = {
        "tries": tries,
        "seeds_bound": sum(t["bound"] for t in tries),
        "seeds_tried": len(tries),
        "chosen_seed": seed,
        "minutes": (time.time() - t0) / 60,
        # paths as given (relative stays relative): the model card names no folder of the training machine
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
        | {"out": str(out_as_given)},
    }
    (args.out / "training_log.json").write_text(json.dumps(summary, indent=2))
    return summary


def run(args: argparse.Namespace) -> None:
    """Train, check and save, as ``train.py``'s options say."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out_as_given = args.out
    args.out = args.out.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok_dir = Path(tempfile.mkdtemp(prefix="miniature_tok_"))
    tokenizer = build_tokenizer(tok_dir)
    log(f"generating {args.images} training images")
    images, _, captions, _ = make_images("diffusion", args.images)
    log("training the VAE")
    vae = train_vae(images, args.vae_steps, args.vae_batch, 1e-3, 1e-6, seed=0)
    with torch.no_grad():
        posts = [vae.encode(images[i : i + 256]).latent_dist for i in range(0, len(images), 256)]
    sf = vae.config.scaling_factor
    latent_mean = torch.cat([q.mean for q in posts]) * sf
    latent_std = torch.cat([q.std for q in posts]) * sf
    tries = []
    chosen = None
    for seed in args.seeds:
        log(f"training U-Net + text encoder, seed {seed}")
        unet, text_encoder, sched, best_step, history = train_denoiser(
            latent_mean, latent_std, captions, tokenizer, vae, args, seed
        )
        backbone = SDUNetBackbone.from_components(vae, unet, text_encoder, tokenizer, sched, name="miniature_sd")
        with torch.no_grad():
            cos = max_pairwise_cosine(class_token_embeddings(text_encoder, tokenizer)).item()
        check = binding_check(backbone, args.check_images)
        bound = check["accuracy"] >= check["chance"] + args.min_gain and cos <= args.max_cosine and check["miou"] >= args.min_miou
        tries.append(
            {
                "seed": seed,
                **check,
                "max_class_cosine": cos,
                "bound": bound,
                "best_step": best_step,
                "history": history,
                "minutes": (time.time() - t0) / 60,
            }
        )
        log(
            f"seed {seed}: foreground class accuracy {check['accuracy']:.3f} (chance {check['chance']:.3f}), "
            f"check mIoU {check['miou']:.3f}, max class-token cosine {cos:.3f} -> "
            f"{'binds' if bound else 'does NOT bind; trying the next seed'}"
        )
        if bound:
            chosen = (unet, text_encoder, sched, seed)
            break
    if chosen is None:
        raise SystemExit(f"no seed of {args.seeds} bound words to shapes: {json.dumps(tries)}")
    unet, text_encoder, sched, seed = chosen
    save_pipeline(args.out, vae, unet, text_encoder, tokenizer, sched)
    summary = write_training_log(args, out_as_given, tries, seed, t0)
    flags = f"--steps {args.steps} --vae-steps {args.vae_steps} --images {args.images} --seeds {' '.join(map(str, args.seeds))}"
    (args.out / "README.md").write_text(
        MODEL_CARD.replace("{classes}", ", ".join(CLASS_NAMES[1:]))
        .replace("{summary}", "```json\n" + json.dumps(summary, indent=2) + "\n```")
        .replace("{argv}", flags)
    )
    log(f"saved to {args.out} ({summary['minutes']:.1f} min, {summary['seeds_bound']}/{summary['seeds_tried']} seeds bound)")
