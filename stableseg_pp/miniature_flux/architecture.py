"""Architecture of the miniature FLUX model, built from the same library classes as FLUX.1 [schnell].

``FluxTransformer2DModel`` (3 double-stream blocks: separate image and text
weights, one joint attention; then 2 single-stream blocks over the
concatenated ``[text; image]`` sequence; RMS q/k norm and 3-axis RoPE, no
guidance embedding, like schnell), a small ``T5EncoderModel`` (the text tokens
the transformer attends to: ``joint_attention_dim`` = its width) with a real
T5 tokenizer (Unigram, no BOS, ``</s>`` at the end, ``<pad>`` padding) on the
miniature vocabulary, a small ``CLIPTextModel`` (only its pooled vector:
``pooled_projection_dim`` = its width) with the miniature world's
``CLIPTokenizer``, a flow-matching Euler scheduler (shift 1, no dynamic
shifting: 64x64 images), and the miniature U-Net model's trained 4-channel
``AutoencoderKL`` with a ``shift_factor`` (as the miniature MM-DiT takes it).
64x64 images -> 16x16 latents -> 2x2 packing -> 8x8 = 64 image tokens of 16
channels (``in_channels`` = 4 x 4).
"""

from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from stableseg_pp.miniature_sd.architecture import WORDS

CLIP_LENGTH = 32  # CLIP tokens per prompt (the pooled vector only; CLIP's 77 is not needed for the captions)
T5_TOKENS = 16  # T5's sequence length (the pipeline's max_sequence_length): the longest caption has 11 tokens
CLIP_WIDTH = 32  # pooled_projection_dim
T5_WIDTH = 64  # joint_attention_dim
LATENT_CHANNELS = 4  # the miniature VAE's
PACK = 2  # FLUX packs 2x2 latent pixels into one token


def build_t5_tokenizer() -> T5TokenizerFast:
    """A real T5 (SentencePiece-style Unigram) tokenizer on the miniature vocabulary: every word of the world is one
    token (``▁word``), any other text falls back to letters; no BOS, ``</s>`` at the end, ``<pad>`` (id 0) pads."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{w}", -1.0) for w in dict.fromkeys(WORDS)] + [(c, -5.0) for c in letters]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = T5TokenizerFast(
        tokenizer_object=tk, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0, model_max_length=T5_TOKENS
    )
    for word in WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"miniature T5 tokenizer splits the vocabulary word {word!r} into {ids}")
    return tok


def build_t5(tokenizer: T5TokenizerFast, width: int = T5_WIDTH) -> T5EncoderModel:
    """T5 v1.1's encoder layout (gated GELU, relative position buckets), small."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 4,
        d_ff=2 * width,
        num_layers=3,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def build_clip(tokenizer: CLIPTokenizer, width: int = CLIP_WIDTH) -> CLIPTextModel:
    """FLUX reads only CLIP's pooled output (the EOS token's final hidden state)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_transformer(
    double: int = 3, single: int = 2, heads: int = 4, head_dim: int = 24, rope: tuple[int, int, int] = (8, 8, 8)
) -> FluxTransformer2DModel:
    if sum(rope) != head_dim or any(a % 2 for a in rope):
        raise ValueError(f"RoPE axes {rope} must be even and sum to the head dim {head_dim}")
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=LATENT_CHANNELS * PACK * PACK,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=False,
        axes_dims_rope=rope,
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flow matching without FLUX's resolution shift (64x64 images: 64 tokens), as schnell's fixed schedule."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
