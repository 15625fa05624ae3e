"""How the miniature model is trained, checked and saved (``python -m stableseg_pp.miniature_mmdit.train`` is the command)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusion3Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from stableseg_pp.backbones.loading import ALIASES
from stableseg_pp.backbones.prompts import map_class_tokens
from stableseg_pp.backbones.sd3_mmdit import SD3Backbone
from stableseg_pp.data.miniature import CLASS_NAMES
from stableseg_pp.miniature_mmdit.architecture import (
    CLIP_WIDTHS,
    TEXT_LENGTH,
    build_scheduler,
    build_text_encoder,
    build_transformer,
)
from stableseg_pp.miniature_sd.architecture import build_tokenizer
from stableseg_pp.miniature_sd.training import binding_check, log, make_images, write_training_log

TEMPLATE = "a photo of a {}"


def prepare_vae(images: torch.Tensor) -> tuple[AutoencoderKL, torch.Tensor, torch.Tensor]:
    """The miniature U-Net model's VAE with SD3's shift and scale; the training latents' mean and std (scaled)."""
    vae = AutoencoderKL.from_pretrained(ALIASES["miniature"], subfolder="vae").eval().requires_grad_(False)
    with torch.no_grad():
        posts = [vae.encode(images[i : i + 256]).latent_dist for i in range(0, len(images), 256)]
    mean = torch.cat([q.mean for q in posts])
    std = torch.cat([q.std for q in posts])
    shift = float(mean.mean())
    scale = float(1.0 / (mean - shift).std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return vae, (mean - shift) * scale, std * scale


def build_pipeline(vae, transformer, encoders, tokenizer, scheduler) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def backbone_of(pipe: StableDiffusion3Pipeline, **kwargs) -> SD3Backbone:
    settings = {"name": "miniature_mmdit", "use_t5": False, "t5_tokens": 0} | kwargs
    return SD3Backbone.from_pipeline(pipe, **settings)


def class_vectors(backbone: SD3Backbone, index: int) -> torch.Tensor:
    """(classes, D) summed name-token embeddings of encoder ``index`` (the per-class conditioning's vectors)."""
    tok = backbone.tokenizers[index]
    mapped = [map_class_tokens(tok, [name], TEMPLATE) for name in CLASS_NAMES[1:]]
    outs = backbone._clip_packed(index, [m.input_ids for m in mapped])
    return torch.stack([o[0][m.positions[0]].sum(0) for o, m in zip(outs, mapped, strict=True)])


def separation_penalty(backbone: SD3Backbone, margin: float) -> tuple[torch.Tensor, float]:
    """Squared cosine above ``margin`` between class vectors, both encoders; and the largest cosine."""
    total, worst = torch.zeros(()), 0.0
    for index in range(len(backbone.tokenizers)):
        e = F.normalize(class_vectors(backbone, index), dim=-1)
        off = (e @ e.T)[~torch.eye(len(e), dtype=torch.bool)]
        total = total + F.relu(off - margin).pow(2).mean()
        worst = max(worst, off.max().item())
    return total, worst


def grounding_check(backbone: SD3Backbone, n_images: int) -> dict:
    """StableSeg (CA) on the held-out check stream for the mean over all blocks and for each block alone, on the
    clean latent and flow-noised (8th of 28 steps): the best setting, and every figure under ``all``.

    Like Seg4Diff's search for a grounding expert: which block binds best is found, not assumed."""
    results = []
    n_blocks = len(backbone.transformer.transformer_blocks)
    for noised in (False, True):
        backbone.add_noise = noised
        for depths in [None, *([d] for d in range(n_blocks))]:
            check = binding_check(backbone, n_images, cross_scales="all", cross_depths=depths)
            results.append({"add_noise": noised, "cross_depths": depths, **check})
    backbone.add_noise = False
    backbone.remove_capture()
    return {**max(results, key=lambda r: r["miou"]), "all": results}


def describe(check: dict) -> str:
    where = "all blocks" if check["cross_depths"] is None else f"block {check['cross_depths'][0]}"
    return f"{where}, {'flow-noised' if check['add_noise'] else 'clean'}"


class BestCheck:
    """The grounding checks of one training and the modules' weights at the step whose check scored best (its
    ``miou``), restored at the end: training keeps the checkpoint that binds best, not the last one."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules = modules
        self.history: list[dict] = []
        self.best: dict | None = None

    def check(self, step: int, run_check) -> dict:
        """The modules in eval mode, ``run_check()``'s result recorded (and the weights kept when it is the best)."""
        for module in self.modules:
            module.eval()
        check = run_check()
        self.history.append({"step": step, **check})
        if self.best is None or check["miou"] > self.best["check"]["miou"]:
            states = [module.state_dict() for module in self.modules]
            self.best = {"step": step, "check": check, "states": [{k: v.clone() for k, v in s.items()} for s in states]}
        return check

    def restore(self) -> int:
        """The best weights back in the modules (frozen, eval mode); the step they come from."""
        for module, state in zip(self.modules, self.best["states"], strict=True):
            module.load_state_dict(state)
            module.eval().requires_grad_(False)
        return self.best["step"]


def optimizer(transformer: torch.nn.Module, encoders: list[torch.nn.Module], args: argparse.Namespace):
    """AdamW over the transformer (``args.lr``) and the text encoders (``args.text_lr``), and its schedule: 100 warmup
    steps, then a cosine to a tenth over ``args.steps``. Returns (parameter groups, optimizer, scheduler)."""
    params = [{"params": transformer.parameters(), "lr": args.lr}]
    params += [{"params": e.parameters(), "lr": args.text_lr} for e in encoders]
    opt = torch.optim.AdamW(params, weight_decay=1e-2)
    warmup = 100

    def lr_lambda(s: int) -> float:
        return min(1.0, (s + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)) * 0.9 + 0.1)

    return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


def optimizer_step(params: list[dict], opt, lr_sched, total: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
    opt.step()
    lr_sched.step()


def train_seed(vae, latent_mean, latent_std, captions, tokenizer, args, seed: int):
    torch.manual_seed(seed)
    transformer = build_transformer(args.layers, args.heads, args.head_dim)
    encoders = [build_text_encoder(tokenizer, w) for w in CLIP_WIDTHS]
    scheduler = build_scheduler()
    pipe = build_pipeline(vae, transformer, encoders, tokenizer, scheduler)
    backbone = backbone_of(pipe, conditioning="joined", attention_maps="image_to_text")
    params, opt, lr_sched = optimizer(transformer, encoders, args)
    gen = torch.Generator().manual_seed(seed)
    n_train = scheduler.config.num_train_timesteps
    kept = BestCheck([transformer, *encoders])
    start = time.time()
    for step in range(1, args.steps + 1):
        transformer.train()
        for e in encoders:
            e.train()
        idx = torch.randint(0, len(latent_mean), (args.batch,), generator=gen)
        x0 = latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        u = compute_density_for_timestep_sampling(args.weighting_scheme, args.batch, 0.0, 1.0, 1.29, generator=gen)
        indices = (u * n_train).long().clamp(max=n_train - 1)
        timesteps = scheduler.timesteps[indices]
        sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        emb, pooled = backbone.encode_prompts([captions[i] for i in idx.tolist()])
        # Without this the pooled caption vector is a shortcut: it tells every image token which classes (and so
        # which colours) are present, and nothing has to attend to the class tokens (no binding emerges).
        keep = torch.rand(args.batch, 1, generator=gen) >= args.pooled_dropout
        pooled = pooled * keep
        pred = transformer(noisy, emb, pooled, timesteps).sample
        weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
        loss = (weighting * (pred - (noise - x0)) ** 2).mean()
        sep, worst = separation_penalty(backbone, args.margin) if args.margin_weight > 0 else (torch.zeros(()), 0.0)
        optimizer_step(params, opt, lr_sched, loss + args.margin_weight * sep)
        if step % 100 == 0 or step == args.steps:
            elapsed = time.time() - start
            log(f"seed {seed} step {step}/{args.steps} fm-loss {loss.item():.4f} sep {sep.item():.4f} ({elapsed:.0f}s)")
        if step % args.eval_every == 0 or step == args.steps:
            check = kept.check(step, lambda: grounding_check(backbone, args.check_images))
            log(
                f"seed {seed} step {step}: best check mIoU {check['miou']:.3f} ({describe(check)}), foreground class "
                f"accuracy {check['accuracy']:.3f}; all blocks clean: {check['all'][0]['miou']:.3f}"
            )
    return pipe, kept.restore(), kept.history


def save_pipeline(out: Path, pipe: StableDiffusion3Pipeline) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".miniature_mmdit.", dir=out.parent))
    pipe.save_pretrained(tmp, safe_serialization=True)
    index = json.loads((tmp / "model_index.json").read_text())
    for name in ("text_encoder_3", "tokenizer_3"):  # no T5: say so, so the pipeline loads without it
        index.setdefault(name, [None, None])
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    for path in [out, *out.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


MODEL_CARD = """# Miniature MM-DiT (stableseg_pp built-in world)

A real flow-matching text-to-image model in the `StableDiffusion3Pipeline`
layout, small enough for a laptop CPU: `SD3Transformer2DModel` ({layers} blocks
of joint attention, {heads} heads of {head_dim}, SD3.5's image-only `attn2` in
blocks 0 and 1, RMS q/k norm, patch size 1 on a 16x16 latent = 256 image
tokens), two `CLIPTextModelWithProjection` encoders ({widths} wide: the CLIP-L
and CLIP-G path, penultimate layer + pooled projections) sharing the miniature
world's `CLIPTokenizer` ({length} tokens), no T5 (`text_encoder_3=None`: call
the pipeline with `max_sequence_length=0`), `FlowMatchEulerDiscreteScheduler`
(shift 1), and the miniature U-Net model's 4-channel `AutoencoderKL` with a
`shift_factor`. It runs the same stage-0 code path as SD3 / SD3.5.

## Data
The miniature world (`stableseg_pp.data.miniature`): 64x64 images of up to
three shapes ({classes}) on textured backgrounds; captions `a photo of a <class>
and <class>`; the seed stream `diffusion`, disjoint from the train/val splits.
No masks are used for training.

## Training (this checkpoint)
{summary}

## Retrain
```
python -m stableseg_pp.miniature_mmdit.train --out stableseg_pp/assets/miniature_mmdit {argv}
```
"""


def run(args: argparse.Namespace) -> None:
    """Train, check and save, as ``train.py``'s options say."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out_as_given = args.out
    args.out = args.out.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tokenizer = build_tokenizer(Path(tempfile.mkdtemp(prefix="miniature_tok_")), max_length=TEXT_LENGTH)
    log(f"generating {args.images} training images")
    images, _, captions, _ = make_images("diffusion", args.images)
    vae, latent_mean, latent_std = prepare_vae(images)
    tries, chosen = [], None
    for seed in args.seeds:
        log(f"training the MM-DiT + text encoders, seed {seed}")
        pipe, best_step, history = train_seed(vae, latent_mean, latent_std, captions, tokenizer, args, seed)
        backbone = backbone_of(pipe, conditioning="joined", attention_maps="image_to_text")
        with torch.no_grad():
            _, cos = separation_penalty(backbone, args.margin)
        check = grounding_check(backbone, args.check_images)
        bound = check["accuracy"] >= check["chance"] + args.min_gain and check["miou"] >= args.min_miou
        tries.append({"seed": seed, **check, "max_class_cosine": cos, "bound": bound, "best_step": best_step,
                      "history": history, "minutes": (time.time() - t0) / 60})  # fmt: skip
        log(
            f"seed {seed}: foreground class accuracy {check['accuracy']:.3f} (chance {check['chance']:.3f}), "
            f"check mIoU {check['miou']:.3f} ({describe(check)}), max class cosine {cos:.3f} -> "
            f"{'binds' if bound else 'does NOT bind; trying the next seed'}"
        )
        if bound:
            chosen = (pipe, seed)
            break
    if chosen is None:
        raise SystemExit(f"no seed of {args.seeds} bound words to shapes: {json.dumps(tries)}")
    pipe, seed = chosen
    save_pipeline(args.out, pipe)
    summary = write_training_log(args, out_as_given, tries, seed, t0)
    flags = f"--steps {args.steps} --batch {args.batch} --images {args.images} --seeds {' '.join(map(str, args.seeds))}"
    card = MODEL_CARD
    for key, value in {
        "{layers}": args.layers,
        "{heads}": args.heads,
        "{head_dim}": args.head_dim,
        "{widths}": " and ".join(map(str, CLIP_WIDTHS)),
        "{length}": TEXT_LENGTH,
        "{classes}": ", ".join(CLASS_NAMES[1:]),
        "{summary}": "```json\n" + json.dumps(summary, indent=2) + "\n```",
        "{argv}": flags,
    }.items():
        card = card.replace(key, str(value))
    (args.out / "README.md").write_text(card)
    log(f"saved to {args.out} ({summary['minutes']:.1f} min, {summary['seeds_bound']}/{summary['seeds_tried']} seeds bound)")
