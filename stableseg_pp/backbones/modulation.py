"""EmerDiff's attention processors: modulate one layer's output inside a segment, inject attention everywhere.

A batch of EmerDiff runs holds, per image, one unmodulated *reference* run and
the modulated runs that follow it step for step (docs/emerdiff.md).
:class:`ModulatedAttentionProcessor` goes on every attention layer of the
denoiser:

* **attention injection**: each run attends with the Query and Key of its
  reference run (``softmax(Q_ref K_ref^T) V``), so its attention probabilities
  are the unmodulated run's at every layer and step, while its values (and so
  its content) are its own. Computed with the fused kernel from the reference's
  Q and K: the image x image probability matrix is never formed or kept;
* **modulation**: on the chosen layer, while ``state.offset`` is set (the first
  denoising step), ``offset[b, n]`` is added to every channel of the layer's
  output after its output projection (``c * M_i``: the strength inside
  segment ``i``, 0 outside).
"""

from __future__ import annotations

import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from stableseg_pp.backbones.attention_math import finish, project
from stableseg_pp.backbones.base import ModulationState


class ModulatedAttentionProcessor:
    """Attention with EmerDiff's injection (and, on the modulated layer, its modulation); a diffusers processor.

    Args:
        state: the shared :class:`ModulationState`.
        name: the layer's site id (for errors).
        modulated: whether this is the layer whose output is modulated.
    """

    def __init__(self, state: ModulationState, name: str, modulated: bool = False):
        self.state = state
        self.name = name
        self.modulated = modulated

    def __call__(
        self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        q, k, v, mask, residual, shape = project(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        reference = self.state.reference
        if reference is not None:
            reference = reference.to(q.device)
            q, k = q[reference], k[reference]
            if mask is not None and mask.shape[0] == q.shape[0]:
                mask = mask[reference]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        offset = self.state.offset if self.modulated else None
        if offset is not None and offset.shape[1] != q.shape[2]:
            raise ValueError(f"{self.name}: modulation offset has {offset.shape[1]} tokens, the layer {q.shape[2]}")
        return finish(attn, out, q, residual, shape, offset=offset)
