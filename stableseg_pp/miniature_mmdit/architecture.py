"""Architecture of the miniature MM-DiT, built from the same library classes as Stable Diffusion 3.5.

``SD3Transformer2DModel`` (joint attention in every block, SD3.5's image-only
``attn2`` in the first two, RMS q/k norm), two CLIP text encoders with
projections (the CLIP-L / CLIP-G path, different widths), the miniature
world's CLIP tokenizer, a flow-matching Euler scheduler, and the miniature
U-Net model's trained 4-channel ``AutoencoderKL`` with a ``shift_factor``
(the smallest VAE that works: 64x64 images -> 16x16 latents). No T5: its
tokens are left out (``t5_tokens: 0``). ``patch_size`` 1 gives 16x16 = 256
image tokens, so the maps are as fine as the U-Net's finest.
"""

from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_LENGTH = 32  # tokens per prompt (CLIP's 77 is not needed for the miniature captions)
CLIP_WIDTHS = (32, 64)  # the "CLIP-L" and "CLIP-G" of the miniature


def build_text_encoder(tokenizer: CLIPTokenizer, width: int) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=3,  # SD3 reads the penultimate layer
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config)


def build_transformer(num_layers: int = 5, heads: int = 4, head_dim: int = 24) -> SD3Transformer2DModel:
    text_width = sum(CLIP_WIDTHS)
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=text_width,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=text_width,
        pos_embed_max_size=16,
        dual_attention_layers=(0, 1),
        qk_norm="rms_norm",
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flow matching without SD3's resolution shift (64x64 images)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
