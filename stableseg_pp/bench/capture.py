"""Benchmark: cost of StableSeg's attention capture on the full-size SD 1.5 U-Net.

The U-Net is built from its configuration with random weights (no download) and
run at 512x512, batch 1, timestep 1:

  (a) stock:  every layer on the fused ``AttnProcessor2_0``;
  (b) ours:   StableSeg's default maps (cross-attention at map sides 8 and 16,
              Query/Key of every self-attention layer for SAR); the rest fused;
  (b+) ours + CAPM + SAR: (b) and the post-processing that turns it into scores;
  (b*) ours, storing every cross-attention layer's class maps (stage 0's default);
  (c) naive:  a prompt-to-prompt style "attention store" that computes and keeps
              every head-mean probability map, self-attention's HW x HW ones too.

Each variant runs in a fresh process, so its peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path

import torch

SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
VARIANTS = ("stock", "ours", "ours_sar", "ours_all_cross", "naive")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _measure(variant: str, resolution: int, repeats: int, device: str, threads: int, queue) -> None:
    from diffusers import UNet2DConditionModel

    from stableseg_pp.backbones.base import AttentionStore, CaptureRequest, select_sites
    from stableseg_pp.backbones.capture import FullAttentionStoreProcessor
    from stableseg_pp.backbones.sd_unet import PROCESSOR_SUFFIX, SDUNetBackbone, unet_sites
    from stableseg_pp.methods.background import BackgroundRule
    from stableseg_pp.methods.capm import aggregate_maps, minmax_normalize
    from stableseg_pp.methods.sar import sar_probabilities

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval().requires_grad_(False).to(device)
    latent = resolution // 8
    backbone = SDUNetBackbone.from_components(None, unet, None, None, None, name="sd15_shaped")
    sites = unet_sites(unet, (latent, latent))
    store = AttentionStore()
    naive_maps: dict[str, torch.Tensor] = {}
    n_classes = 3
    cross = select_sites(sites, "text", "all" if variant == "ours_all_cross" else [8, 16])
    selfs = select_sites(sites, "image", "all")
    if variant.startswith("ours"):
        backbone.install_capture(CaptureRequest(tuple(s.id for s in cross), tuple(s.id for s in selfs)), store)
    elif variant == "naive":
        unet.set_attn_processor({s.id + PROCESSOR_SUFFIX: FullAttentionStoreProcessor(naive_maps, s.id) for s in sites})
    else:
        backbone.remove_capture()
    x = torch.randn(1, 4, latent, latent, device=device)
    emb = torch.randn(1, 77, 768, device=device)
    t = torch.ones(1, dtype=torch.long, device=device)
    weights = torch.zeros(1, 77, n_classes, device=device)
    for c in range(n_classes):
        weights[0, 5 + c, c] = 1.0
    valid = torch.ones(1, n_classes + 1, dtype=torch.bool, device=device)
    default_weights = {s.id: 1.0 for s in select_sites(sites, "text", [8, 16])}

    def step():
        store.reset(weights, (latent, latent))
        naive_maps.clear()
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=emb)
            if variant == "ours_sar":
                size = (resolution, resolution)
                capm = BackgroundRule().prepend(minmax_normalize(aggregate_maps(store.cross, default_weights, size)))
                qk = ((q, k, store.map_shape(q.shape[2])) for q, k in store.self_qk.values())
                sar_probabilities(qk, capm.argmax(1), valid, size)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base_rss = _current_rss_mib()
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    kept = sum(m.numel() * m.element_size() for m in naive_maps.values()) + sum(
        m.numel() * m.element_size() for m in store.cross.values()
    )
    kept += sum(q.numel() * q.element_size() * 2 for q, _ in store.self_qk.values())
    result = {
        "variant": variant,
        "seconds": sorted(times)[len(times) // 2],
        "all_seconds": times,
        "peak_rss_mib": _peak_rss_mib(),
        "model_rss_mib": base_rss,
        "kept_mib": kept / 2**20,
    }
    if device.startswith("cuda"):
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    queue.put(result)


def run_variant(variant: str, resolution: int, repeats: int, device: str, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(variant, resolution, repeats, device, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m stableseg_pp.bench capture", description=__doc__)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    results = {}
    for v in args.variants:
        r = run_variant(v, args.resolution, args.repeats, args.device, args.threads)
        results[v] = r
        extra = f", peak GPU {r['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in r else ""
        print(
            f"{v:15s} {r['seconds']:7.3f} s/forward (median of {args.repeats}), peak RSS {r['peak_rss_mib']:8.0f} MiB "
            f"(model {r['model_rss_mib']:.0f} MiB), maps kept {r['kept_mib']:8.1f} MiB{extra}",
            flush=True,
        )
    if "stock" in results:
        a = results["stock"]
        print(f"\nSD 1.5 U-Net, {args.resolution}x{args.resolution}, batch 1, {args.device}:")
        for v, r in results.items():
            if v == "stock":
                continue
            mem = r["peak_rss_mib"] / a["peak_rss_mib"]
            extra_a = a["peak_rss_mib"] - a["model_rss_mib"]
            extra_v = r["peak_rss_mib"] - r["model_rss_mib"]
            line = f"  {v}/stock: time {r['seconds'] / a['seconds']:.3f}x, peak memory {mem:.3f}x"
            line += f" (activation peak above the model: {extra_v:.0f} vs {extra_a:.0f} MiB)"
            if "peak_gpu_mib" in r:
                line += f", peak GPU memory {r['peak_gpu_mib'] / a['peak_gpu_mib']:.3f}x"
            print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results
