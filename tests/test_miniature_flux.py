"""The shipped miniature FLUX model: a ``FluxPipeline`` folder (small, with its model card and training log) that the
``miniature_flux`` preset loads through :class:`~stableseg_pp.backbones.flux.FluxBackbone` for stage 0."""

from __future__ import annotations

import json

import torch
from diffusers import FluxPipeline
from hydra.utils import instantiate

from stableseg_pp.backbones.flux import FluxBackbone
from stableseg_pp.backbones.loading import ALIASES
from stableseg_pp.data.miniature import CLASS_NAMES
from stableseg_pp.miniature_sd.training import make_images
from stableseg_pp.stages.step import build_backbone

SITES = {f"transformer_blocks.{i}.attn" for i in range(3)} | {f"single_transformer_blocks.{j}.attn" for j in range(2)}


def test_shipped_miniature_flux_is_a_flux_pipeline():
    folder = ALIASES["miniature_flux"]
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, f"{folder} is {size / 2**20:.1f} MB"
    assert (folder / "README.md").exists()
    log = json.loads((folder / "training_log.json").read_text())
    assert log["chosen_seed"] in [t["seed"] for t in log["tries"]]
    pipe = FluxPipeline.from_pretrained(folder)
    config = pipe.transformer.config
    assert (config.num_layers, config.num_single_layers, config.guidance_embeds) == (3, 2, False)
    assert config.in_channels == 4 * pipe.vae.config.latent_channels == 16  # 2x2 packing of the 4-channel latent
    assert config.joint_attention_dim == pipe.text_encoder_2.config.d_model  # T5 gives the text tokens
    assert config.pooled_projection_dim == pipe.text_encoder.config.hidden_size  # CLIP the pooled vector
    assert sum(config.axes_dims_rope) == config.attention_head_dim
    assert pipe.vae.config.shift_factor is not None
    assert not pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 1.0


def test_miniature_flux_preset_gives_stage0_class_maps(compose_fit):
    cfg = compose_fit("diffusion=miniature_flux")
    backbone = build_backbone(cfg)
    assert isinstance(backbone, FluxBackbone) and backbone.dtype == torch.float32
    sites = backbone.sites(cfg.zero_shot.resolution)  # from the configs, before any weights load
    assert {s.id for s in sites} == SITES and {s.grid for s in sites} == {(8, 8)}  # 64 px -> 16x16 latent -> 8x8 tokens
    backbone.load()
    seg = instantiate(cfg.zero_shot)(backbone)
    images, _, _, classes = make_images("val", 2)
    names = [[CLASS_NAMES[c] for c in image] for image in classes]
    k = max(len(n) for n in names)
    with torch.no_grad():
        out = seg(images, names)
    assert out.scores.shape == (2, 1 + k, 64, 64) and out.scores.isfinite().all()
    assert out.labels.shape == (2, 64, 64) and int(out.labels.max()) <= k
    assert out.valid.tolist() == [[True] + [c < len(n) for c in range(k)] for n in names]
    assert set(out.cross_maps) == SITES  # every block's class maps are kept for stage 2
    backbone.remove_capture()
