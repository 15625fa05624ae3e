"""Benchmark: one MAGNET training step on an SD3-Medium-shaped MM-DiT (random weights, no download).

The transformer (24 blocks at 1024x1024: 4,096 image tokens, 77 CLIP + 256 T5 text tokens) gets rank-16 LoRA
adapters on ``to_q``/``to_k``/``to_v``/``to_out.0`` of every attention site (peft, as ``stage=magnet``); a step
is the forward with the grounding expert's (block 9) pre-softmax image-to-text logits captured, flow-matching
loss + focal/dice mask loss, backward and an AdamW step. Variants, each in a fresh process (its own peak memory):

  plain          no gradient checkpointing
  checkpointing  ``enable_gradient_checkpointing()`` (less activation memory, a second forward in the backward)

``--layers``/``--resolution`` shrink the model for a CPU; on a GPU run it with no arguments (bf16 autocast).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import torch

from stableseg_pp.bench.capture import _current_rss_mib, _peak_rss_mib
from stableseg_pp.bench.capture_mmdit import SD3_MEDIUM

VARIANTS = ("plain", "checkpointing")


def _measure(variant: str, args: dict, queue) -> None:
    from diffusers import SD3Transformer2DModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from stableseg_pp.backbones.base import AttentionStore
    from stableseg_pp.backbones.joint_capture import JointAttentionMapProcessor
    from stableseg_pp.methods.magnet_losses import mask_loss
    from stableseg_pp.models.magnet import LORA_PROJECTIONS, lora_target_modules

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = args["device"]
    cuda = device.startswith("cuda")
    dtype = getattr(torch, args["dtype"])
    torch.manual_seed(0)
    tr = SD3Transformer2DModel(**(SD3_MEDIUM | {"num_layers": args["layers"]})).to(device, dtype).requires_grad_(False)
    sites = [n.removesuffix(".processor") for n in tr.attn_processors]
    tr.add_adapter(LoraConfig(r=args["rank"], lora_alpha=args["rank"], init_lora_weights="gaussian",
                              target_modules=lora_target_modules(tr, sites, LORA_PROJECTIONS)))  # fmt: skip
    cast_training_params(tr, dtype=torch.float32)
    if variant == "checkpointing":
        tr.enable_gradient_checkpointing()
    tr.train()
    block = f"transformer_blocks.{min(args['block'], args['layers'] - 1)}.attn"
    store = AttentionStore()
    tr.set_attn_processor(
        {n: JointAttentionMapProcessor(store, n.removesuffix(".processor"), class_maps=False,
                                       text_logits=n.removesuffix(".processor") == block)
         for n in tr.attn_processors if n.removesuffix(".processor").endswith(".attn")}
        | {n: tr.attn_processors[n] for n in tr.attn_processors if not n.removesuffix(".processor").endswith(".attn")}
    )  # fmt: skip
    params = [p for p in tr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    latent = args["resolution"] // 8
    b, k = args["batch"], args["classes"]
    x0 = torch.randn(b, 16, latent, latent, device=device, dtype=dtype)
    text = torch.randn(b, args["text_tokens"], 4096, device=device, dtype=dtype)
    pooled = torch.randn(b, 2048, device=device, dtype=dtype)
    weights = torch.zeros(b, args["text_tokens"], k, device=device)
    for c in range(k):
        weights[:, 1 + c, c] = 0.5
        weights[:, 77 + c, c] = 0.5
    masks = torch.rand(b, k, args["resolution"], args["resolution"], device=device) > 0.5
    valid = torch.ones(args["resolution"], args["resolution"], dtype=torch.bool, device=device)

    def step():
        sigma = torch.rand(b, 1, 1, 1, device=device)
        noise = torch.randn_like(x0)
        noisy = ((1 - sigma) * x0 + sigma * noise).to(dtype)
        store.reset(weights, (latent, latent))
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype, enabled=dtype != torch.float32):
            pred = tr(noisy, text, pooled, sigma.flatten() * 1000).sample
        fm = ((pred.float() - (noise - x0).float()) ** 2).mean()
        logits = torch.nn.functional.interpolate(store.text_logits[block], size=masks.shape[-2:], mode="bilinear")
        parts = [mask_loss(logits[i], masks[i], valid) for i in range(b)]
        loss = fm + sum(0.1 * p.focal + 0.2 * p.dice for p in parts) / b
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    base_rss = _current_rss_mib()
    step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = {"variant": variant, "seconds": sorted(times)[len(times) // 2], "all_seconds": times,
              "peak_rss_mib": _peak_rss_mib(), "model_rss_mib": base_rss,
              "trainable_parameters": sum(p.numel() for p in params)}  # fmt: skip
    if cuda:
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    queue.put(result)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m stableseg_pp.bench magnet", description=__doc__)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--block", type=int, default=9)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--text-tokens", type=int, default=333, help="77 CLIP + 256 T5")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    results = {}
    for v in args.variants:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(v, vars(args), queue))
        proc.start()
        results[v] = r = queue.get()
        proc.join()
        gpu = f", peak GPU {r['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in r else ""
        print(f"{v:14s} {r['seconds']:8.3f} s/step, peak RSS {r['peak_rss_mib']:7.0f} MiB{gpu} "
              f"({r['trainable_parameters'] / 1e6:.1f} M LoRA parameters)", flush=True)  # fmt: skip
    if len(results) == 2:
        a, c = results["plain"], results["checkpointing"]
        key = "peak_gpu_mib" if "peak_gpu_mib" in a else "peak_rss_mib"
        print(f"\nMAGNET step, SD3-Medium-shaped MM-DiT ({args.layers} blocks), {args.resolution}x{args.resolution}, "
              f"batch {args.batch}, {args.dtype}, {args.device}: checkpointing/plain time {c['seconds'] / a['seconds']:.2f}x, "
              f"peak memory {c[key] / a[key]:.2f}x ({key})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results
