"""What every backbone family shares when it finds and names its weights: aliases of the shipped
miniature models, local folders vs hub ids, content fingerprints, dtypes, LoRA adapters."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from stableseg_pp.runtime.errors import ConfigError
from stableseg_pp.runtime.hashing import file_fingerprint, folder_fingerprint

ASSETS = Path(__file__).resolve().parent.parent / "assets"
#: the models shipped in the package (``assets/<name>/model_index.json``), by the name a config gives as
#: ``diffusion.pretrained``: a new shipped model is found by its folder; ``miniature`` is the U-Net's older name
ALIASES = {path.parent.name: path.parent for path in sorted(ASSETS.glob("*/model_index.json"))}
ALIASES["miniature"] = ASSETS / "miniature_sd"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: the file name diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` reads from a folder
LORA_FILE = "pytorch_lora_weights.safetensors"


def resolve_model_path(pretrained: str) -> str:
    """Map an alias to its folder; return a local folder or a hub id unchanged."""
    if pretrained in ALIASES:
        return str(ALIASES[pretrained])
    return pretrained


def model_identity(pretrained: str) -> dict[str, str]:
    """A local folder or single file by its name and content fingerprint (not its path), a hub id by its id."""
    path = Path(resolve_model_path(pretrained)).expanduser()
    if path.is_dir():
        return {"folder": path.name, "fingerprint": folder_fingerprint(path)}
    if path.is_file():
        return {"file": path.name, "fingerprint": file_fingerprint(path)}
    return {"hub_id": pretrained}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"diffusion.dtype={dtype!r}: use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def pipeline_folder_or_hub_id(pretrained: str, example_hub_id: str) -> tuple[str, bool]:
    """A diffusers pipeline folder (alias or path) or a hub id, and whether it is local; a clear error otherwise."""
    source = resolve_model_path(pretrained)
    local = Path(source).expanduser()
    if local.exists():
        if not (local / "model_index.json").exists():
            raise ConfigError(
                f"diffusion.pretrained={pretrained}: {local} is not a diffusers pipeline folder (no model_index.json); "
                f"pass a folder written by save_pretrained or a hub id such as '{example_hub_id}'"
            )
        return str(local), True
    if "/" not in source or source.startswith((".", "/", "~")):
        raise ConfigError(f"diffusion.pretrained={pretrained!r}: no such folder, and not a hub id of the form 'org/name'")
    return source, False


def offline_hint(pretrained: str, reason: str) -> str:
    """The one-line message for weights that could not be read (the library's pointer to a stack trace that the
    one-line report does not show is left out)."""
    reason = re.sub(r"\s*[^.;]*stack ?trace above[^.;]*[.;]?", "", reason, flags=re.IGNORECASE).strip(" .;")
    return (
        f"diffusion.pretrained={pretrained}: could not load it ({reason}). Without network access, download the model "
        "elsewhere and pass its local folder or single file (diffusion.pretrained=/path), or pre-fill the Hugging Face "
        "cache (HF_HOME) on a machine with network access"
    )


def lora_weights_file(lora: str) -> Path:
    """The weights of ``diffusion.lora``: a ``.safetensors`` file, a folder holding ``pytorch_lora_weights.safetensors``
    (diffusers' ``save_lora_weights``), or a MAGNET step folder (its ``adapter/``); a clear error otherwise."""
    path = Path(lora).expanduser()
    candidates = [path] if path.is_file() else [path / LORA_FILE, path / "adapter" / LORA_FILE]
    for candidate in candidates:
        if candidate.is_file() and candidate.suffix == ".safetensors":
            return candidate
    raise ConfigError(
        f"diffusion.lora={lora}: no LoRA weights there; give a .safetensors file, a folder holding {LORA_FILE} "
        "(diffusers' save_lora_weights) or a finished magnet-<hash> step folder"
    )


def lora_identity(lora: str | None) -> dict[str, dict[str, str]]:
    """The adapter's part of a backbone's identity: its file name and content fingerprint (empty without one)."""
    if not lora:
        return {}
    file = lora_weights_file(lora)
    return {"lora": {"file": file.name, "fingerprint": file_fingerprint(file)}}


def apply_lora(pipe, lora: str) -> None:
    """Load a diffusers-format LoRA with the pipeline's own ``load_lora_weights``, fuse it into the weights and drop
    the adapter layers (the attention processors then see plain projections, at the speed of the base model)."""
    file = lora_weights_file(lora)
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    except (ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"diffusion.lora={lora}: not a LoRA of this model ({str(err).splitlines()[0]})") from err
    pipe.fuse_lora()
    pipe.unload_lora_weights()
