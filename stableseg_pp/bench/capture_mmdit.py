"""Benchmark: cost of the joint-attention capture on an SD3-Medium-shaped MM-DiT (random weights, no download).

One denoiser forward at 1024x1024 (4,096 image tokens) with 77 CLIP + 256 T5 text tokens, batch 1:

  stock        every block on the fused ``JointAttnProcessor2_0``;
  ours_block   class maps of one block (Seg4Diff's block 9): image-to-text probabilities out of the fused kernel;
  ours_all     class maps of every block (the SD3 zero-shot paper's mean over blocks);
  ours_both    every block, image-to-text averaged with text-to-image (the paper's maps);
  seg4diff     Seg4Diff's explicit capture of block 9: the full joint matrix per head, image-to-text kept.

Each variant runs in a fresh process (its own peak memory). ``--layers``/``--resolution`` shrink the model for a CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import torch

from stableseg_pp.bench.capture import _current_rss_mib, _peak_rss_mib

SD3_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
}  # fmt: skip
VARIANTS = ("stock", "ours_block", "ours_all", "ours_both", "seg4diff")


def _measure(variant: str, args: dict, queue) -> None:
    from diffusers import SD3Transformer2DModel
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from stableseg_pp.backbones.base import AttentionStore
    from stableseg_pp.backbones.joint_capture import FullJointAttentionProcessor, JointAttentionMapProcessor

    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device, dtype = args["device"], getattr(torch, args["dtype"])
    torch.manual_seed(0)
    config = SD3_MEDIUM | {"num_layers": args["layers"]}
    tr = SD3Transformer2DModel(**config).eval().requires_grad_(False).to(device, dtype)
    block = min(args["block"], args["layers"] - 1)
    latent = args["resolution"] // 8
    x = torch.randn(1, 16, latent, latent, device=device, dtype=dtype)
    text = torch.randn(1, args["text_tokens"], 4096, device=device, dtype=dtype)
    pooled = torch.randn(1, 2048, device=device, dtype=dtype)
    t = torch.tensor([1.0], device=device)
    store, full = AttentionStore(), {}
    weights = torch.zeros(1, args["text_tokens"], args["classes"], device=device)
    for c in range(args["classes"]):
        weights[0, 1 + c, c] = 0.5
        weights[0, 77 + c, c] = 0.5
    names = list(tr.attn_processors)
    processors = {n: JointAttnProcessor2_0() for n in names}
    for n in names:
        site = n.removesuffix(".processor")
        if not site.endswith(".attn"):
            continue
        chosen = variant in ("ours_all", "ours_both") or site == f"transformer_blocks.{block}.attn"
        if variant.startswith("ours") and chosen:
            directions = "both" if variant == "ours_both" else "image_to_text"
            processors[n] = JointAttentionMapProcessor(store, site, directions=directions)
        elif variant == "seg4diff" and chosen:
            processors[n] = FullJointAttentionProcessor(full, site)
    tr.set_attn_processor(processors)

    def step():
        store.reset(weights, (latent, latent))
        full.clear()
        with torch.no_grad():
            tr(x, text, pooled, t)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    base_rss = _current_rss_mib()
    step()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = {"variant": variant, "seconds": sorted(times)[len(times) // 2], "all_seconds": times,
              "peak_rss_mib": _peak_rss_mib(), "model_rss_mib": base_rss}  # fmt: skip
    if device.startswith("cuda"):
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    queue.put(result)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m stableseg_pp.bench capture_mmdit", description=__doc__)
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--block", type=int, default=9)
    p.add_argument("--text-tokens", type=int, default=333, help="77 CLIP + 256 T5")
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
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
        print(f"{v:11s} {r['seconds']:8.3f} s/forward, peak RSS {r['peak_rss_mib']:7.0f} MiB{gpu}", flush=True)
    if "stock" in results:
        a = results["stock"]
        print(f"\nSD3-Medium-shaped MM-DiT ({args.layers} blocks), {args.resolution}x{args.resolution}, {args.dtype}, "
              f"{args.device}:")  # fmt: skip
        key = "peak_gpu_mib" if "peak_gpu_mib" in a else "peak_rss_mib"
        for v, r in results.items():
            if v != "stock":
                print(f"  {v}/stock: time {r['seconds'] / a['seconds']:.3f}x, peak memory {r[key] / a[key]:.3f}x ({key})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results
