"""Architecture of the miniature latent diffusion model, built from the real library classes.

The same classes as Stable Diffusion 1.x (``AutoencoderKL``, ``UNet2DConditionModel``,
``CLIPTextModel``, ``CLIPTokenizer``), only small: 64x64 images, a 4x VAE, a
16x16 latent, cross-attention at the 16x16, 8x8 and 4x4 (mid) levels.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stableseg_pp.data.miniature import CLASS_NAMES

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WORDS = ("a", "an", "the", "photo", "picture", "of", "and", "with", "background") + tuple(
    w for name in CLASS_NAMES[1:] for w in name.split()
)


def write_tokenizer_files(folder: str | Path, words: tuple[str, ...] = WORDS) -> Path:
    """Train and write ``vocab.json`` and ``merges.txt`` of a small CLIP-style BPE vocabulary.

    The BPE model is trained with the ``tokenizers`` library using CLIP's own
    pre-tokenization (byte-level, ``</w>`` word endings): every byte is a token,
    so any text tokenizes, and the words of the miniature world are whole tokens.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE(unk_token=EOS, end_of_word_suffix="</w>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    singles = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(string.punctuation)
    tk.train_from_iterator([" ".join(words)] * 4 + [" ".join(singles)], trainer)
    tk.model.save(str(folder))
    return folder


def build_tokenizer(folder: str | Path, max_length: int = 77) -> CLIPTokenizer:
    """A real ``CLIPTokenizer`` (BOS, EOS, padding to ``max_length``) on the small vocabulary."""
    write_tokenizer_files(folder)
    config = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, "model_max_length": max_length}
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config))
    tok = CLIPTokenizer.from_pretrained(str(folder))
    for word in WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"miniature tokenizer splits the vocabulary word {word!r} into {ids}")
    return tok


def build_text_encoder(tokenizer: CLIPTokenizer, width: int = 64) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        projection_dim=width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(cross_attention_dim: int = 64) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=16,
    )


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def build_noise_scheduler() -> DDPMScheduler:
    """The training noise schedule of Stable Diffusion 1.x."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
    )
