"""Capture processors for MM-DiT joint attention (diffusers ``JointAttnProcessor2_0`` path, SD3 / SD3.5).

A joint block attends over one sequence of image and text tokens (SD3:
``[image; text]``, FLUX: ``[text; image]``: :class:`JointLayout`). The
class maps StableSeg needs are the **image-to-text** probabilities, normalised
over the *whole* joint key set exactly as the model computes them. They come
out of the same fused ``F.scaled_dot_product_attention`` call that computes the
block's output: the values are extended by the (tokens x classes) weight
matrix on the text rows and zeros on the image rows, so the extra output
columns are ``sum_t P[i, t] W[t, c]`` per head. Memory is image-tokens x
classes per head; the image x image matrix is never formed (Seg4Diff
materialises it: about 0.9 GB per block in fp16 at 1024x1024).

The text-to-image part (text queries over the joint keys, text-tokens x image-
tokens per head) is computed explicitly when asked for; so are the pre-softmax
image-to-text logits (with gradients, for MAGNET).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from stableseg_pp.backbones.base import AttentionStore
from stableseg_pp.backbones.concept_stream import ConceptStream, output_space_maps

DIRECTIONS = ("image_to_text", "both", "output_space")


@dataclass(frozen=True)
class JointLayout:
    """Where a family puts the image and the text tokens in its joint sequence."""

    text_first: bool = False

    def join(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Per-head tensors (B, heads, n, d) of both parts -> the joint sequence."""
        return torch.cat([text, image] if self.text_first else [image, text], 2)

    def ranges(self, n_image: int, n_text: int) -> tuple[slice, slice]:
        """(image, text) positions in the joint sequence."""
        if self.text_first:
            return slice(n_text, n_text + n_image), slice(0, n_text)
        return slice(0, n_image), slice(n_image, n_image + n_text)

    def key_weights(self, weights: torch.Tensor, n_image: int) -> torch.Tensor:
        """(B, T, C) weights of the text tokens -> (B, L, C) weights of the joint keys (image keys weigh nothing)."""
        return F.pad(weights, (0, 0, 0, n_image) if self.text_first else (0, 0, n_image, 0))


IMAGE_FIRST = JointLayout(text_first=False)  # SD3 / SD3.5
TEXT_FIRST = JointLayout(text_first=True)  # FLUX


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, inner = x.shape
    return x.view(b, n, heads, inner // heads).transpose(1, 2)


def joint_projections(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor):
    """Image and text Q, K, V split into heads (B, heads, n, d), exactly as ``JointAttnProcessor2_0`` computes them."""
    q, k, v = (_heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    cq, ck, cv = (_heads(f(encoder_hidden_states), attn.heads) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        cq = attn.norm_added_q(cq)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    return (q, k, v), (cq, ck, cv)


def joint_outputs(
    attn: Attention, out: torch.Tensor, n_image: int, dtype: torch.dtype, layout: JointLayout = IMAGE_FIRST
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the joint output (B, heads, N + T, d) and project it, as ``JointAttnProcessor2_0`` does."""
    b, heads, n, d = out.shape
    out = out.transpose(1, 2).reshape(b, n, heads * d).to(dtype)
    image_range, text_range = layout.ranges(n_image, n - n_image)
    image, text = out[:, image_range], out[:, text_range]
    if not attn.context_pre_only:
        text = attn.to_add_out(text)
    image = attn.to_out[1](attn.to_out[0](image))
    return image, text


def attention_with_class_maps(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_weights: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused attention whose output also carries ``P @ key_weights`` (one pass of the fused kernel).

    q, k, v: (B, heads, L, d); key_weights: (B, L, C), one row per key. Returns the attention output (B, heads, L, d)
    and the per-head class probabilities (B, heads, L, C). Q and K are zero-padded to the widened value width so
    every SDPA backend (flash included) takes it; the scale is passed explicitly, so the scores are unchanged.
    """
    b, heads, length, d = v.shape
    c = key_weights.shape[-1]
    width = -(-(d + c) // 8) * 8  # a multiple of 8 for the fused kernels
    extra = key_weights.to(v.dtype)[:, None].expand(b, heads, length, c)
    v_wide = F.pad(torch.cat([v, extra], dim=-1), (0, width - d - c))
    q_wide = F.pad(q, (0, width - d))
    k_wide = F.pad(k, (0, width - d))
    out = F.scaled_dot_product_attention(q_wide, k_wide, v_wide, dropout_p=0.0, is_causal=False, scale=scale)
    return out[..., :d], out[..., d : d + c]


def joint_attention_maps(
    image: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    text: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weights: torch.Tensor,
    scale: float,
    layout: JointLayout,
    directions: str = "image_to_text",
    per_head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Joint attention over ``layout.join(image, text)`` and its per-class maps, the image x image matrix never formed.

    image, text: (q, k, v) per head (B, heads, n, d) of each part; weights: (B, T, C) per text token. Returns the
    output (B, heads, N + T, d) in the layout's order, the head-mean class maps (B, N, C) and, with ``per_head``,
    each head's (B, heads, N, C): image-to-text probabilities normalised over all joint keys (``directions="both"``:
    averaged with the transposed text-to-image ones).
    """
    (q, k, v), (cq, ck, cv) = image, text
    n_image = q.shape[2]
    image_range, _ = layout.ranges(n_image, cq.shape[2])
    k_all = layout.join(k, ck)
    out, per_class = attention_with_class_maps(
        layout.join(q, cq), k_all, layout.join(v, cv), layout.key_weights(weights, n_image), scale
    )
    heads = per_class[:, :, image_range].float()  # (B, heads, N, C): image-to-text, joint normalisation
    maps = heads.mean(dim=1)
    if directions == "both":
        # text queries over the joint keys (T x (N + T) per head), their image columns, transposed
        # logits in float32, as the fused kernel keeps them (bf16 would round them to 1/8 at 16)
        probs = torch.matmul(cq.float() * scale, k_all.float().transpose(-1, -2)).softmax(dim=-1)
        to_image = probs[..., image_range]  # (B, heads, T, N)
        maps = (maps + torch.bmm(to_image.mean(dim=1).transpose(1, 2), weights.float())) / 2
        if per_head:
            heads = (heads + torch.matmul(to_image.transpose(-1, -2), weights.float()[:, None])) / 2
    return out, maps, heads if per_head else None


def image_to_text_logits(q: torch.Tensor, ck: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """Pre-softmax image-to-text logits, head mean, per class (B, N, C), in float32 and with gradients (MAGNET)."""
    logits = torch.matmul(q.float() * scale, ck.float().transpose(-1, -2)).mean(dim=1)  # (B, N, T)
    return torch.bmm(logits, weights.to(logits.device, torch.float32))


class JointAttentionMapProcessor:
    """``JointAttnProcessor2_0`` that also records, for one block, what StableSeg and MAGNET read.

    Args:
        store: where the maps go (keyed by ``name``).
        name: the site id.
        class_maps: record per-class maps (B, C, h, w) in ``store.cross``: the head-mean image-to-text probabilities
            weighted by ``store.token_weights`` (``directions="both"``: averaged with the transposed text-to-image ones).
        query_keys: keep the image tokens' Query/Key features (for SAR) in ``store.self_qk``.
        text_logits: keep the pre-softmax image-to-text logits, head mean, weighted per class (B, C, h, w), with
            gradients, in ``store.text_logits``.
        directions: ``image_to_text`` (Seg4Diff), ``both`` (the SD3 zero-shot paper) or ``output_space``
            (ConceptAttention: image outputs against the concept stream's, which ``concepts`` carries).
        per_head: with ``class_maps``, also keep each head's class maps (B, heads, C, h, w) in ``store.cross_heads``.
        layout: the order of the joint sequence (SD3: image first).
        concepts: the concept stream this block passes on (``output_space``; on every block of its path, also where
            nothing is recorded): its queries attend to this block's image keys here.
    """

    def __init__(
        self,
        store: AttentionStore,
        name: str,
        class_maps: bool = True,
        query_keys: bool = False,
        text_logits: bool = False,
        directions: str = "image_to_text",
        per_head: bool = False,
        layout: JointLayout = IMAGE_FIRST,
        concepts: ConceptStream | None = None,
    ):
        if directions not in DIRECTIONS:
            raise ValueError(f"directions={directions!r} is not one of {DIRECTIONS}")
        if directions == "output_space" and concepts is None:
            raise ValueError(f"{name}: output_space maps need the concept stream (concepts=)")
        self.store = store
        self.name = name
        self.class_maps = class_maps
        self.query_keys = query_keys
        self.text_logits = text_logits
        self.directions = directions
        self.per_head = per_head
        self.layout = layout
        self.concepts = concepts

    def attend(self, image: tuple, text: tuple, scale: float) -> torch.Tensor:
        """Joint attention of the image and text parts ((q, k, v) per head, (B, heads, n, d) each) in ``self.layout``'s
        order, recording what was asked; the output (B, heads, N + T, d) in that order. Shared by every family whose
        blocks attend jointly (SD3 here, FLUX's double- and single-stream processors)."""
        store, layout = self.store, self.layout
        (q, k, v), (cq, ck, cv) = image, text
        n_image = q.shape[2]
        weights = store.token_weights
        if weights is not None:
            weights = weights.to(q.device)
        maps = heads = None
        if self.class_maps and weights is not None and self.directions != "output_space":
            out, maps, heads = joint_attention_maps(image, text, weights, scale, layout, self.directions, self.per_head)
        else:  # the stock kernel call
            q_all, k_all, v_all = layout.join(q, cq), layout.join(k, ck), layout.join(v, cv)
            out = F.scaled_dot_product_attention(q_all, k_all, v_all, dropout_p=0.0, is_causal=False)
        concept_out = self.concepts.attend(k, v) if self.concepts is not None else None
        if concept_out is not None and self.class_maps and self.directions == "output_space":
            image_range, _ = layout.ranges(n_image, cq.shape[2])
            maps, heads = output_space_maps(out[:, :, image_range], concept_out, self.concepts.valid, self.per_head)
        if maps is not None:
            h, w = store.map_shape(n_image)
            store.cross[self.name] = maps.transpose(1, 2).reshape(maps.shape[0], -1, h, w)
            if heads is not None:
                store.cross_heads[self.name] = heads.transpose(2, 3).reshape(*heads.shape[:2], -1, h, w)
        if self.query_keys:
            store.self_qk[self.name] = (q.detach(), k.detach())
        if self.text_logits and weights is not None:
            h, w = store.map_shape(n_image)
            per_class = image_to_text_logits(q, ck, weights, scale)
            store.text_logits[self.name] = per_class.transpose(1, 2).reshape(per_class.shape[0], -1, h, w)
        return out

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:
            raise ValueError(f"{self.name}: JointAttentionMapProcessor installed on an image-only attention")
        image, text = joint_projections(attn, hidden_states, encoder_hidden_states)
        out = self.attend(image, text, attn.scale)
        return joint_outputs(attn, out, image[0].shape[2], image[0].dtype, self.layout)


class FullJointAttentionProcessor:
    """Seg4Diff's capture: the whole (N + T) x (N + T) joint probability matrix computed explicitly per head, its
    image-to-text block kept (head mean). Only for the benchmark: the image x image part is what ours never forms."""

    def __init__(self, store: dict[str, torch.Tensor], name: str, layout: JointLayout = IMAGE_FIRST):
        self.store = store
        self.name = name
        self.layout = layout

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        (q, k, v), (cq, ck, cv) = joint_projections(attn, hidden_states, encoder_hidden_states)
        layout = self.layout
        n_image = q.shape[2]
        image_range, text_range = layout.ranges(n_image, cq.shape[2])
        q_all, k_all, v_all = layout.join(q, cq), layout.join(k, ck), layout.join(v, cv)
        probs = (torch.matmul(q_all, k_all.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
        self.store[self.name] = probs[:, :, image_range, text_range].mean(dim=1)
        return joint_outputs(attn, torch.matmul(probs, v_all), n_image, q.dtype, layout)
