"""Benchmark: k class prompts through a CLIP-L-shaped text encoder, one hopping-mask pass vs k passes.

The per-class conditioning of the MM-DiT family encodes ``a photo of a <class>``
for every class of a batch. Stock: one padded 77-token sequence per prompt
(a batch of k). Hopping mask: the prompts packed into as few 77-token rows as
they fill, kept independent by the block mask (their outputs are equal; see
tests/test_mmdit.py). The encoder is CLIP-L's configuration with random
weights (no download); the tokenizer is the miniature world's byte-level BPE,
which spells unknown words in more tokens than CLIP's, so the packing here is
if anything pessimistic.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from stableseg_pp.backbones.hopping import encode_packed, pack_prompts
from stableseg_pp.miniature_sd.architecture import build_tokenizer

NAMES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor",
]  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    p = argparse.ArgumentParser(prog="python -m stableseg_pp.bench hopping", description=__doc__)
    p.add_argument("--classes", type=int, default=20, help="class prompts (at most 20)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = p.parse_args(argv)
    tok = build_tokenizer(tempfile.mkdtemp(prefix="hopping_tok_"))
    config = CLIPTextConfig(
        vocab_size=max(len(tok), 1000), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    dtype = getattr(torch, args.dtype)
    enc = CLIPTextModelWithProjection(config).eval().to(args.device, dtype)
    prompts = [f"a photo of a {n}" for n in NAMES[: args.classes]]
    lists = [tok(pr).input_ids for pr in prompts]

    def separate():
        ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids.to(args.device)
        return enc(ids, output_hidden_states=True).hidden_states[-2]

    def run(ids, positions, mask):
        out = enc(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True)
        return (out.hidden_states[-2],)

    def packed():
        return encode_packed(run, lists, 77, tok.pad_token_id, True, args.device)

    def timed(fn) -> float:
        with torch.no_grad():
            fn()
            times = []
            for _ in range(args.repeats):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    t_sep, t_hop = timed(separate), timed(packed)
    rows = len(pack_prompts(lists, 77, tok.pad_token_id, causal=True).input_ids)
    print(f"{len(prompts)} class prompts ({sum(len(x) for x in lists)} tokens), CLIP-L-shaped encoder, {args.device}:")
    print(f"  separate passes : {len(prompts)} rows of 77, {t_sep * 1000:8.1f} ms (median of {args.repeats})")
    print(f"  hopping mask    : {rows} rows of 77, {t_hop * 1000:8.1f} ms")
    print(f"  speed-up        : {t_sep / t_hop:.2f}x")
    return {"separate_s": t_sep, "hopping_s": t_hop, "speedup": t_sep / t_hop}
