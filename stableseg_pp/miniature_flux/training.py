"""How the miniature FLUX model is trained, checked and saved (``python -m stableseg_pp.miniature_flux.train`` is the
command). It follows the miniature MM-DiT's training (:mod:`stableseg_pp.miniature_mmdit.training`) on FLUX's
interfaces: packed latents, T5 tokens, CLIP's pooled vector, ``timestep / 1000``, all through
:class:`~stableseg_pp.backbones.flux.FluxBackbone` (``encode_prompts``, ``denoise``) so that training and use agree."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from stableseg_pp.backbones.base import TextConditioning
from stableseg_pp.backbones.flux import FluxBackbone, pack_latents
from stableseg_pp.backbones.prompts import map_class_tokens
from stableseg_pp.data.miniature import CLASS_NAMES
from stableseg_pp.miniature_flux.architecture import (
    CLIP_LENGTH,
    CLIP_WIDTH,
    T5_TOKENS,
    T5_WIDTH,
    build_clip,
    build_scheduler,
    build_t5,
    build_t5_tokenizer,
    build_transformer,
)
from stableseg_pp.miniature_mmdit.training import BestCheck, optimizer, optimizer_step, prepare_vae
from stableseg_pp.miniature_sd.architecture import build_tokenizer
from stableseg_pp.miniature_sd.training import binding_check, log, make_images, write_training_log

TEMPLATE = "a photo of a {}"


def build_pipeline(vae, transformer, clip, clip_tokenizer, t5, t5_tokenizer, scheduler) -> FluxPipeline:
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def backbone_of(pipe: FluxPipeline, **kwargs) -> FluxBackbone:
    settings = {"name": "miniature_flux", "dtype": "float32", "t5_tokens": T5_TOKENS} | kwargs
    return FluxBackbone.from_pipeline(pipe, **settings)


def class_vectors(backbone: FluxBackbone) -> torch.Tensor:
    """(classes, W) summed name-token T5 embeddings (the per-class conditioning's vectors), one hopping-mask pass."""
    mapped = [map_class_tokens(backbone.tokenizer_2, [name], TEMPLATE, max_length=T5_TOKENS) for name in CLASS_NAMES[1:]]
    outs = backbone._t5_packed([m.input_ids for m in mapped])
    return torch.stack([o[m.positions[0]].sum(0) for o, m in zip(outs, mapped, strict=True)])


def separation_penalty(backbone: FluxBackbone, margin: float) -> tuple[torch.Tensor, float]:
    """Squared cosine above ``margin`` between the T5 class vectors; and the largest cosine."""
    e = F.normalize(class_vectors(backbone), dim=-1)
    off = (e @ e.T)[~torch.eye(len(e), dtype=torch.bool)]
    return F.relu(off - margin).pow(2).mean(), off.max().item()


def block_groups(backbone: FluxBackbone) -> list[tuple[str, list[int] | None]]:
    """(label, cross_depths) of every setting the check measures: all blocks, the double-stream blocks together, the
    single-stream blocks together, each block alone (depths: double-stream first, as :func:`flux_sites` orders them)."""
    n_double = len(backbone.transformer.transformer_blocks)
    n_single = len(backbone.transformer.single_transformer_blocks)
    double, single = list(range(n_double)), list(range(n_double, n_double + n_single))
    groups = [("all", None), ("double", double), ("single", single)]
    groups += [(f"double {d}", [d]) for d in double] + [(f"single {d - n_double}", [d]) for d in single]
    return groups


def grounding_check(backbone: FluxBackbone, n_images: int) -> dict:
    """StableSeg (CA) on the held-out check stream for the mean over all blocks, over the double-stream and over the
    single-stream blocks, and for each block alone, on the clean latent and flow-noised (8th of 28 steps): the best
    setting, and every figure under ``all``. Which block binds best is found, not assumed (as Seg4Diff's search)."""
    results = []
    for noised in (False, True):
        backbone.add_noise = noised
        for label, depths in block_groups(backbone):
            check = binding_check(backbone, n_images, cross_scales="all", cross_depths=depths)
            results.append({"add_noise": noised, "blocks": label, "cross_depths": depths, **check})
    backbone.add_noise = False
    backbone.remove_capture()
    return {**max(results, key=lambda r: r["miou"]), "all": results}


def describe(check: dict) -> str:
    return f"{check['blocks']}, {'flow-noised' if check['add_noise'] else 'clean'}"


def summary_line(check: dict) -> str:
    """All blocks / double / single / best single block, clean latent and flow-noised."""
    parts = []
    for noised in (False, True):
        rows = [r for r in check["all"] if r["add_noise"] == noised]
        by = {r["blocks"]: r["miou"] for r in rows}
        block = max((r for r in rows if len(r["cross_depths"] or []) == 1), key=lambda r: r["miou"])
        parts.append(
            f"{'noised' if noised else 'clean'}: all {by['all']:.3f}, double {by['double']:.3f}, single "
            f"{by['single']:.3f}, best block {block['blocks']} {block['miou']:.3f}"
        )
    return "; ".join(parts)


def train_seed(vae, latent_mean, latent_std, captions, tokenizers, args, seed: int):
    torch.manual_seed(seed)
    transformer = build_transformer(args.double, args.single, args.heads, args.head_dim, tuple(args.rope))
    clip, t5 = build_clip(tokenizers[0]), build_t5(tokenizers[1])
    encoders = [clip, t5]
    scheduler = build_scheduler()
    pipe = build_pipeline(vae, transformer, clip, tokenizers[0], t5, tokenizers[1], scheduler)
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
        x0 = pack_latents(x0)  # (B, 64, 16): the 2x2 packing of FluxPipeline
        noise = torch.randn(x0.shape, generator=gen)
        u = compute_density_for_timestep_sampling(args.weighting_scheme, args.batch, 0.0, 1.0, 1.29, generator=gen)
        indices = (u * n_train).long().clamp(max=n_train - 1)
        timesteps = scheduler.timesteps[indices]  # sigma * 1000: the backbone's time units
        sigmas = scheduler.sigmas[indices].view(-1, 1, 1)
        noisy = (1.0 - sigmas) * x0 + sigmas * noise  # FlowMatchingNoise.noise_to, one time per sample
        emb, pooled = backbone.encode_prompts([captions[i] for i in idx.tolist()])  # as FluxPipeline.encode_prompt
        # Without this the pooled caption vector is a shortcut: it tells every image token which classes (and so
        # which colours) are present, and nothing has to attend to the T5 class tokens (no binding emerges).
        keep = torch.rand(args.batch, 1, generator=gen) >= args.pooled_dropout
        text = TextConditioning((emb, pooled * keep), emb.new_zeros(args.batch, emb.shape[1], 0), keep.new_zeros(args.batch, 0))
        pred = backbone.denoise(noisy, timesteps, text)  # timestep / 1000, zero txt_ids, the 8x8 grid's img_ids
        weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas)
        loss = (weighting * (pred - backbone.prediction_target(x0, noise, 0.0)) ** 2).mean()
        sep, _ = separation_penalty(backbone, args.margin) if args.margin_weight > 0 else (torch.zeros(()), 0.0)
        optimizer_step(params, opt, lr_sched, loss + args.margin_weight * sep)
        if step % 100 == 0 or step == args.steps:
            elapsed = time.time() - start
            log(f"seed {seed} step {step}/{args.steps} fm-loss {loss.item():.4f} sep {sep.item():.4f} ({elapsed:.0f}s)")
        if step % args.eval_every == 0 or step == args.steps:
            check = kept.check(step, lambda: grounding_check(backbone, args.check_images))
            log(
                f"seed {seed} step {step}: best check mIoU {check['miou']:.3f} ({describe(check)}), foreground class "
                f"accuracy {check['accuracy']:.3f}; {summary_line(check)}"
            )
    return pipe, kept.restore(), kept.history


def save_pipeline(tmp: Path, pipe: FluxPipeline) -> None:
    """The pipeline into ``tmp`` (a folder beside the target; :func:`publish` renames it into place)."""
    pipe.save_pretrained(tmp, safe_serialization=True)


def publish(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished folder ``tmp`` (model, card and log appear together)."""
    for path in [tmp, *tmp.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    if out.exists():
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


MODEL_CARD = """# Miniature FLUX (stableseg_pp built-in world)

A real flow-matching text-to-image model in the `FluxPipeline` layout, small
enough for a laptop CPU: `FluxTransformer2DModel` ({double} double-stream blocks
then {single} single-stream blocks, {heads} heads of {head_dim}, RoPE axes {rope},
RMS q/k norm, no guidance embedding like FLUX.1 [schnell]) on 2x2-packed latents
(64x64 image -> 16x16 latent -> 8x8 = 64 tokens of 16 channels), a
`T5EncoderModel` ({t5_width} wide, 3 layers; its tokens are what the transformer
attends to, {t5_tokens} of them) with a T5 tokenizer on the miniature vocabulary, a
`CLIPTextModel` ({clip_width} wide; only its pooled vector is used) with the
miniature world's `CLIPTokenizer` ({clip_length} tokens),
`FlowMatchEulerDiscreteScheduler` (shift 1, no dynamic shifting), and the
miniature U-Net model's 4-channel `AutoencoderKL` with a `shift_factor` (as
the miniature MM-DiT). Call the pipeline with `height=64, width=64,
max_sequence_length={t5_tokens}`. It runs the same stage-0 code path as FLUX.1
(`stableseg_pp.backbones.flux.FluxBackbone`, `diffusion=miniature_flux`).

## Data
The miniature world (`stableseg_pp.data.miniature`): 64x64 images of up to
three shapes ({classes}) on textured backgrounds; captions `a photo of a <class>
and <class>`; the seed stream `diffusion`, disjoint from the train/val splits.
No masks are used for training.

## Training (this checkpoint)
Flow matching (`x_t = (1 - s) x0 + s eps`, target `eps - x0`, `{weighting}` times),
batch {batch}, {steps} steps per seed, the pooled CLIP vector zeroed for
{dropout_pct}% of the samples (so that the image tokens must attend to the T5 class
tokens), a margin penalty on the T5 class vectors. The checkpoint kept is the one
whose attention segments the held-out `check` stream best (all blocks, the
double- or single-stream blocks, or one block; clean or flow-noised).
Result: {verdict}

```json
{summary}
```

## Retrain
```
python -m stableseg_pp.miniature_flux.train --out stableseg_pp/assets/miniature_flux {argv}
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
    tokenizers = (build_tokenizer(Path(tempfile.mkdtemp(prefix="miniature_tok_")), max_length=CLIP_LENGTH), build_t5_tokenizer())
    log(f"generating {args.images} training images")
    images, _, captions, _ = make_images("diffusion", args.images)
    vae, latent_mean, latent_std = prepare_vae(images)
    tries, candidates = [], []
    for seed in args.seeds:
        elapsed = (time.time() - t0) / 60
        per_seed = tries[-1]["minutes"] / len(tries) if tries else 0.0
        if tries and elapsed + per_seed > args.max_minutes:
            log(f"not trying seed {seed}: {elapsed:.1f} min spent, a seed takes ~{per_seed:.1f}, budget {args.max_minutes}")
            break
        log(f"training the FLUX transformer + text encoders, seed {seed}")
        pipe, best_step, history = train_seed(vae, latent_mean, latent_std, captions, tokenizers, args, seed)
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
            f"{'binds' if bound else 'does NOT bind'}; {summary_line(check)}"
        )
        candidates.append((check["miou"], bound, pipe, seed))
        if bound:
            break
    bound_ones = [c for c in candidates if c[1]]
    if not bound_ones and not args.keep_unbound:
        raise SystemExit(f"no seed of {args.seeds} bound words to shapes: {json.dumps(tries)}")
    _, bound, pipe, seed = (bound_ones or sorted(candidates, key=lambda c: c[0]))[-1]
    tmp = Path(tempfile.mkdtemp(prefix=".miniature_flux.", dir=args.out.parent))
    save_pipeline(tmp, pipe)
    summary = write_training_log(argparse.Namespace(**(vars(args) | {"out": tmp})), out_as_given, tries, seed, t0)
    chosen = next(t for t in tries if t["seed"] == seed)
    verdict = (
        f"seed {seed} {'binds' if bound else 'does NOT bind'} class words to shapes on the check stream: foreground "
        f"class accuracy {chosen['accuracy']:.3f} (chance {chosen['chance']:.3f}), mIoU {chosen['miou']:.3f} "
        f"({describe(chosen)}); {summary_line(chosen)}. Required: accuracy >= chance + {args.min_gain}, "
        f"mIoU >= {args.min_miou}."
    )
    flags = f"--steps {args.steps} --batch {args.batch} --images {args.images} --seeds {' '.join(map(str, args.seeds))}" + (
        " --keep-unbound" if args.keep_unbound else ""
    )
    card = MODEL_CARD
    for key, value in {
        "{double}": args.double,
        "{single}": args.single,
        "{heads}": args.heads,
        "{head_dim}": args.head_dim,
        "{rope}": " + ".join(map(str, args.rope)),
        "{t5_width}": T5_WIDTH,
        "{t5_tokens}": T5_TOKENS,
        "{clip_width}": CLIP_WIDTH,
        "{clip_length}": CLIP_LENGTH,
        "{classes}": ", ".join(CLASS_NAMES[1:]),
        "{weighting}": args.weighting_scheme,
        "{batch}": args.batch,
        "{steps}": args.steps,
        "{dropout_pct}": round(100 * args.pooled_dropout),
        "{verdict}": verdict,
        "{summary}": json.dumps(summary, indent=2),
        "{argv}": flags,
    }.items():
        card = card.replace(key, str(value))
    (tmp / "README.md").write_text(card)
    publish(tmp, args.out)
    log(f"saved to {args.out} ({summary['minutes']:.1f} min, {summary['seeds_bound']}/{summary['seeds_tried']} seeds bound)")
