"""ConceptAttention's maps recomputed independently with the stock processors (tests of both MM-DiT families).

The concept tokens of one image are run through each block *as its text*: a
block called with ``encoder_hidden_states=concepts`` makes the concepts attend
to ``[concepts; image]`` with the text weights and returns their next residual
state, which is the concept stream's definition (the image part of such a call
is thrown away: the image keeps what the real forward computed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _single(block) -> bool:
    return hasattr(block, "proj_mlp")


def reference_concept_maps(
    blocks: Sequence[torch.nn.Module], run: Callable[[], object], weights: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per block of ``blocks`` (the stream's path): the (B, N, C) concept maps and the per-head (B, heads, N, C) ones
    of the forward ``run`` makes (stock processors installed), for class weights (B, T, C); classes a prompt does not
    name (zero columns) are left out of its stream and score 0."""
    inputs: dict[int, dict] = {}
    image_out: dict[int, torch.Tensor] = {}
    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, kw, i=i: inputs.__setitem__(i, kw), with_kwargs=True))
        if _single(block):
            hooks.append(block.attn.register_forward_hook(lambda m, a, out, i=i: image_out.__setitem__(i, out)))
        else:
            hooks.append(block.attn.to_out[0].register_forward_pre_hook(lambda m, a, i=i: image_out.__setitem__(i, a[0])))
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    for i, block in enumerate(blocks):
        if _single(block):  # [text; image] rows: keep the image's
            image_out[i] = image_out[i][:, inputs[i]["encoder_hidden_states"].shape[1] :]

    b, _, c = weights.shape
    maps = [torch.zeros(b, image_out[i].shape[1], c) for i in range(len(blocks))]
    heads = [torch.zeros(b, blocks[i].attn.heads, image_out[i].shape[1], c) for i in range(len(blocks))]
    for n in range(b):
        valid = weights[n].sum(0) > 0
        share = weights[n][:, valid] / weights[n][:, valid].sum(0)
        concepts = torch.einsum("td,tc->cd", inputs[0]["encoder_hidden_states"][n], share)[None]
        for i, block in enumerate(blocks):
            kw, k = inputs[i], concepts.shape[1]
            call = {"hidden_states": kw["hidden_states"][n : n + 1], "encoder_hidden_states": concepts}
            call["temb"] = kw["temb"][n : n + 1]
            if kw.get("image_rotary_emb") is not None:  # FLUX: the concepts take the text's position (zero ids)
                t = kw["encoder_hidden_states"].shape[1]
                call["image_rotary_emb"] = tuple(torch.cat([r[:k], r[t:]]) for r in kw["image_rotary_emb"])
            seen: list[torch.Tensor] = []
            if _single(block):
                hook = block.attn.register_forward_hook(lambda m, a, out, seen=seen, k=k: seen.append(out[:, :k]))
            elif getattr(block.attn, "context_pre_only", False):  # no projection of the text: returned as it is
                hook = block.attn.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out[1]))
            else:
                hook = block.attn.to_add_out.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0]))
            with torch.no_grad():
                concepts = block(**call)[0]
            hook.remove()
            attended = seen[0][0]  # (K, D) before the output projection
            image = image_out[i][n]  # (N, D)
            maps[i][n][:, valid] = image @ attended.T
            h = blocks[i].attn.heads
            per_head = image.unflatten(-1, (h, -1)).transpose(0, 1) @ attended.unflatten(-1, (h, -1)).permute(1, 2, 0)
            heads[i][n][:, :, valid] = per_head
    return maps, heads
