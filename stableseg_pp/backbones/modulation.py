"""EmerDiff's attention processors: modulate one layer's output inside a segment, inject attention everywhere
(:class:`ModulatedAttentionProcessor` on the ``Attention`` path of the U-Net, and
:class:`ModulatedJointAttentionProcessor` on an MM-DiT's joint attention).

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
from stableseg_pp.backbones.joint_capture import IMAGE_FIRST, JointLayout, joint_outputs, joint_projections


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


class ModulatedJointAttentionProcessor:
    """EmerDiff's injection and modulation on an MM-DiT joint attention (``JointAttnProcessor2_0`` path).

    Every run attends with its reference run's Query and Key over the **whole** joint token set (image and text),
    so its image-to-image and image-to-text probabilities are the reference's while its values are its own; on the
    modulated block ``offset[b, n]`` is added to every channel of the image stream's projected output (the text
    stream untouched).

    Args:
        state: the shared :class:`ModulationState`.
        name: the block's site id (for errors).
        modulated: whether this is the block whose image output is modulated.
        layout: the order of the joint sequence (SD3: image first).
    """

    def __init__(self, state: ModulationState, name: str, modulated: bool = False, layout: JointLayout = IMAGE_FIRST):
        self.state = state
        self.name = name
        self.modulated = modulated
        self.layout = layout

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if encoder_hidden_states is None:  # an image-only attention of a joint block (SD3.5's attn2)
            return ModulatedAttentionProcessor(self.state, self.name, self.modulated)(attn, hidden_states)
        (q, k, v), (cq, ck, cv) = joint_projections(attn, hidden_states, encoder_hidden_states)
        layout, n_image = self.layout, q.shape[2]
        q_all, k_all, v_all = layout.join(q, cq), layout.join(k, ck), layout.join(v, cv)
        reference = self.state.reference
        if reference is not None:
            reference = reference.to(q.device)
            q_all, k_all = q_all[reference], k_all[reference]
        out = F.scaled_dot_product_attention(q_all, k_all, v_all, dropout_p=0.0, is_causal=False)
        image, text = joint_outputs(attn, out, n_image, q.dtype, layout)
        offset = self.state.offset if self.modulated else None
        if offset is not None:
            if offset.shape[1] != n_image:
                raise ValueError(f"{self.name}: modulation offset has {offset.shape[1]} tokens, the block {n_image}")
            image = image + offset.to(image.dtype)[:, :, None]
        return image, text
