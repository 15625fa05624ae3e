"""ConceptAttention's concept stream (Helbling et al., ICML 2025) for the MM-DiT families (SD3 / SD3.5, FLUX).

One concept token per class rides through the transformer's blocks next to the
image and text, with the blocks' **text-stream** weights (a double-stream
block's ``norm1_context``, ``add_{q,k,v}_proj``, ``to_add_out``,
``ff_context``; a FLUX single-stream block's shared weights): each block, the
concept queries attend to ``[concepts; image]`` keys in a call of their own,
and nothing reads the concepts, so the image and text tokens compute exactly
what the stock model computes. A class's map at a block is the dot product of
each image token's attention output with the class token's, before the output
projections, summed over heads ("output space", the paper's finding: sharper
than attention probabilities).

The stream starts from each class's text tokens as the first block receives
them (after ``context_embedder``), averaged with the prompt's class weights:
with per-class conditioning that is the class vector itself. Concept tokens
get RoPE position 0 as FLUX's text tokens do (the rotation is the identity), so
only the image keys carry positions.

Hooks on the blocks do the normalisation and residual updates (a block's
forward is diffusers' own); the attention itself happens in the capture
processor of each block (:class:`~stableseg_pp.backbones.joint_capture.JointAttentionMapProcessor`),
which holds the block's image keys and values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stableseg_pp.backbones.base import AttentionSite, AttentionStore


def _argument(args: tuple, kwargs: dict, name: str, position: int):
    return kwargs[name] if name in kwargs else args[position]


def _heads(x: torch.Tensor, attn) -> torch.Tensor:
    """(B, K, heads * d) -> (B, heads, K, d)."""
    return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    return x if module is None else module(x)


def is_single_stream(block: torch.nn.Module) -> bool:
    """A block whose text and image share every weight (FLUX's single-stream blocks: one AdaLN, MLP in parallel)."""
    return hasattr(block, "proj_mlp") and not hasattr(block, "norm1_context")


@dataclass
class _Pending:
    """One block's concept work between its pre-hook and its post-hook."""

    qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # concept Q, K, V (B, heads, K, d)
    modulation: tuple[torch.Tensor, ...]  # the block's AdaLN gates / shifts / scales for the concepts
    mlp: torch.Tensor | None = None  # a single-stream block's MLP branch of the concepts
    output: torch.Tensor | None = None  # the concepts' attention output (B, heads, K, d), set by the processor


class ConceptStream:
    """The concept tokens of one forward, carried through ``blocks`` (in order) by hooks on them.

    Args:
        store: the capture store whose ``token_weights`` (B, T, C) say which text tokens make each class; a forward
            without weights (a caption) runs no stream.
    """

    def __init__(self, store: AttentionStore):
        self.store = store
        self.blocks: list[torch.nn.Module] = []
        self.states: torch.Tensor | None = None  # (B, C, D) the concept tokens entering the current block
        self.valid: torch.Tensor | None = None  # (B, C) classes the prompt names
        self.pending: _Pending | None = None
        self._hooks: list = []

    @classmethod
    def for_store(cls, current: ConceptStream | None, store: AttentionStore) -> ConceptStream:
        """``current`` when it serves ``store``; else a new stream (``current``'s hooks removed)."""
        if current is not None and current.store is store:
            return current
        if current is not None:
            current.remove()
        return cls(store)

    def follow(self, denoiser: torch.nn.Module, sites: Sequence[AttentionSite], class_maps: Sequence[str]) -> tuple[str, ...]:
        """Hooks on the blocks from the first joint site to the deepest one in ``class_maps`` (their attention's
        parent modules, found by structure); returns the joint sites on that path, which need the capture processor
        whether or not anything is recorded there."""
        joint = sorted((s for s in sites if s.kind == "joint"), key=lambda s: s.depth)
        asked = [i for i, s in enumerate(joint) if s.id in class_maps]
        if not asked:
            self.remove()
            return ()
        path = joint[: max(asked) + 1]
        owner = {id(m.attn): m for m in denoiser.modules() if isinstance(getattr(m, "attn", None), torch.nn.Module)}
        self.install([owner[id(denoiser.get_submodule(s.id))] for s in path])
        return tuple(s.id for s in path)

    # -- hooks --------------------------------------------------------------------------------------------------------

    def install(self, blocks: Sequence[torch.nn.Module]) -> None:
        """Hooks on ``blocks`` (the stream's path, first block first); replaces any earlier ones."""
        self.remove()
        self.blocks = list(blocks)
        for block in self.blocks:
            self._hooks.append(block.register_forward_pre_hook(self._before, with_kwargs=True))
            self._hooks.append(block.register_forward_hook(self._after, with_kwargs=True))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self.blocks = [], []
        self.states = self.valid = self.pending = None

    @property
    def active(self) -> bool:
        return self.pending is not None

    def _before(self, block, args, kwargs) -> None:
        self.pending = None
        if getattr(block.attn.processor, "concepts", None) is not self:  # processors replaced (EmerDiff, by hand)
            self.states = None  # the stream rests until the capture processors are back
            return
        if block is self.blocks[0]:
            self._start(_argument(args, kwargs, "encoder_hidden_states", 1))
        if self.states is None:
            return
        temb = _argument(args, kwargs, "temb", 2)
        attn, states = block.attn, self.states.to(temb.dtype)
        if is_single_stream(block):
            normed, gate = block.norm(states, emb=temb)
            q, k, v = attn.to_q(normed), attn.to_k(normed), attn.to_v(normed)
            qkv = (_norm(attn.norm_q, _heads(q, attn)), _norm(attn.norm_k, _heads(k, attn)), _heads(v, attn))
            self.pending = _Pending(qkv, (gate,), mlp=block.act_mlp(block.proj_mlp(normed)))
            return
        if getattr(block, "context_pre_only", False):  # SD3's last block: no text output, so the stream ends here
            normed, modulation = block.norm1_context(states, temb), ()
        else:
            normed, *modulation = block.norm1_context(states, emb=temb)
        q, k, v = attn.add_q_proj(normed), attn.add_k_proj(normed), attn.add_v_proj(normed)
        qkv = (_norm(attn.norm_added_q, _heads(q, attn)), _norm(attn.norm_added_k, _heads(k, attn)), _heads(v, attn))
        self.pending = _Pending(qkv, tuple(modulation))

    def _start(self, text: torch.Tensor) -> None:
        """The concept tokens entering the first block: each class's text tokens averaged with its weights."""
        weights = self.store.token_weights
        if weights is None:
            self.states = self.valid = None
            return
        weights = weights.to(text.device, torch.float32)
        total = weights.sum(1)  # (B, C)
        share = weights / total[:, None].clamp_min(1e-12)
        self.states = torch.einsum("btd,btc->bcd", text.float(), share).to(text.dtype)
        self.valid = total > 0

    def attend(self, image_keys: torch.Tensor, image_values: torch.Tensor) -> torch.Tensor | None:
        """The concepts' attention over ``[concepts; image]`` (image K after RoPE and V, (B, heads, N, d), as the
        block computed them); (B, heads, C, d), or None when no stream runs. Unnamed classes are no keys."""
        if self.pending is None:
            return None
        q, k, v = self.pending.qkv
        keys, values = torch.cat([k, image_keys.to(k.dtype)], 2), torch.cat([v, image_values.to(v.dtype)], 2)
        mask = None
        if not bool(self.valid.all()):
            mask = F.pad(self.valid.to(q.device), (0, image_keys.shape[2]), value=True)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, dropout_p=0.0, is_causal=False)
        self.pending.output = out
        return out

    def _after(self, block, args, kwargs, output) -> None:
        pending, self.pending = self.pending, None
        if pending is None or pending.output is None:
            return
        attn, states = block.attn, self.states.to(pending.output.dtype)
        attended = pending.output.transpose(1, 2).flatten(2)  # (B, C, heads * d)
        if is_single_stream(block):
            (gate,) = pending.modulation
            self.states = states + gate[:, None] * block.proj_out(torch.cat([attended, pending.mlp], dim=2))
        elif getattr(block, "context_pre_only", False):
            self.states = None
            return
        else:
            gate_msa, shift_mlp, scale_mlp, gate_mlp = pending.modulation
            states = states + gate_msa[:, None] * attn.to_add_out(attended)
            normed = block.norm2_context(states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            self.states = states + gate_mlp[:, None] * block.ff_context(normed)
        if self.states.dtype == torch.float16:
            self.states = self.states.clip(-65504, 65504)


def output_space_maps(
    image: torch.Tensor, concepts: torch.Tensor, valid: torch.Tensor, per_head: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ConceptAttention's maps: image attention outputs (B, heads, N, d) against the concepts' (B, heads, C, d),
    both before the output projections. Returns the (B, N, C) dot products of the concatenated heads (the sum over
    heads) and, with ``per_head``, each head's (B, heads, N, C); classes the prompt does not name (``valid`` (B, C)
    false) score 0. Raw scores: StableSeg's per-class min-max and background rule decide, as for the other maps (a
    softmax over the one to three classes a prompt names would be flat for one class)."""
    per = torch.matmul(image.float(), concepts.float().transpose(-1, -2))
    per = per * valid.to(per.device)[:, None, None, :]
    return per.sum(1), per if per_head else None
