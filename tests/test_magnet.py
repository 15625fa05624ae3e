"""MAGNET: the mask loss by hand, Hungarian pairing, LoRA training touching only the adapters, the diffusers LoRA
format, resuming a killed training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from stableseg_pp.methods.magnet_losses import dice_loss, focal_loss, mask_loss, match, pairwise_cost


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_focal_loss_uses_the_probability_in_the_modulating_factor():
    x = torch.tensor([[2.0, -1.0]])
    t = torch.tensor([[1.0, 0.0]])
    valid = torch.tensor([True, True])
    p = [sigmoid(2.0), sigmoid(-1.0)]
    # pixel 1: target 1, p_t = p; pixel 2: target 0, p_t = 1 - p; alpha_t = 0.25 / 0.75
    by_hand = [0.25 * (1 - p[0]) ** 2 * -math.log(p[0]), 0.75 * p[1] ** 2 * -math.log(1 - p[1])]
    assert by_hand[0] == pytest.approx(4.505e-4, rel=1e-3) and by_hand[1] == pytest.approx(0.01699, rel=1e-3)
    got = focal_loss(x, t, valid).item()
    assert got == pytest.approx(sum(by_hand) / 2, rel=1e-5)
    # the published code puts the raw logit where p belongs: p_t = x t + (1 - x)(1 - t), a different (wrong) value
    ce = [-math.log(p[0]), -math.log(1 - p[1])]
    wrong_pt = [2.0 * 1 + (1 - 2.0) * 0, -1.0 * 0 + (1 - -1.0) * 1]
    wrong = (0.25 * (1 - wrong_pt[0]) ** 2 * ce[0] + 0.75 * (1 - wrong_pt[1]) ** 2 * ce[1]) / 2
    assert wrong == pytest.approx(0.1333, rel=1e-3) and abs(got - wrong) > 0.1


def test_dice_loss_by_hand_and_ignored_pixels():
    x = torch.tensor([[0.0, 0.0, 10.0]])
    t = torch.tensor([[1.0, 0.0, 1.0]])
    # sigmoid(0) = 0.5: 1 - (2 * 0.5 + 1) / (0.5 + 0.5 + 1 + 1) = 1/3, the third pixel ignored
    assert dice_loss(x, t, torch.tensor([True, True, False])).item() == pytest.approx(1 / 3, rel=1e-6)
    assert dice_loss(x, t, torch.tensor([True, True, True])).item() < 1 / 3  # counted, it is a confident hit
    # an ignored pixel changes the focal loss neither
    f_ignored = focal_loss(x, t, torch.tensor([True, True, False]))
    assert f_ignored.item() == pytest.approx(focal_loss(x[:, :2], t[:, :2], torch.tensor([True, True])).item())


def test_hungarian_pairing_recovers_a_known_permutation():
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(4, 12, 12)
    for i, (y, x) in enumerate([(0, 0), (0, 6), (6, 0), (6, 6)]):
        masks[i, y : y + 6, x : x + 6] = 1
    perm = torch.tensor([2, 0, 3, 1])  # prediction i shows mask perm[i]
    logits = (masks[perm] * 8 - 4 + torch.randn(4, 12, 12, generator=g)).flatten(1)
    valid = torch.ones(144, dtype=torch.bool)
    rows, cols = match(pairwise_cost(logits, masks.flatten(1), valid))
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == dict(enumerate(perm.tolist()))
    # the matched loss equals the loss of the pairs given explicitly, and beats the prompt order
    hungarian = mask_loss(logits.view(4, 12, 12), masks, valid.view(12, 12), "hungarian")
    explicit = mask_loss(logits.view(4, 12, 12), masks[perm], valid.view(12, 12), "prompt")
    in_order = mask_loss(logits.view(4, 12, 12), masks, valid.view(12, 12), "prompt")
    assert hungarian.dice.item() == pytest.approx(explicit.dice.item()) and hungarian.focal.item() == pytest.approx(
        explicit.focal.item()
    )
    assert in_order.dice > hungarian.dice
    # more predictions than masks: each mask gets its best prediction
    rows, cols = match(pairwise_cost(logits, masks[:2].flatten(1), valid))
    assert sorted(zip(cols.tolist(), rows.tolist(), strict=True)) == [(0, 1), (1, 3)]


def _module(**kwargs):
    from stableseg_pp.backbones.sd3_mmdit import SD3Backbone
    from stableseg_pp.models.magnet import MagnetModule

    backbone = SD3Backbone(name="miniature_mmdit", pretrained="miniature_mmdit", use_t5=False, t5_tokens=0)
    sites = [s.id for s in backbone.sites(64) if s.kind == "joint"] + ["transformer_blocks.0.attn2"]
    module = MagnetModule(backbone, "transformer_blocks.2.attn", sites, rank=4, alpha=4, lr=5e-3, **kwargs)
    module.configure_model()
    return module


def _batch(n: int = 3):
    g = torch.Generator().manual_seed(1)
    targets = torch.zeros(n, 64, 64, dtype=torch.uint8)
    targets[:, 10:40, 8:30] = 1
    targets[:, 40:60, 35:60] = 2
    targets[:, :2] = 255
    return {"pixels": torch.rand(n, 3, 64, 64, generator=g) * 2 - 1, "names": [["circle", "square"]] * n, "targets": targets}


def test_lora_steps_change_only_the_adapters_and_load_back_through_the_pipeline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from stableseg_pp.backbones.loading import ALIASES
    from stableseg_pp.backbones.sd3_mmdit import SD3Backbone
    from stableseg_pp.stages.magnet import save_adapter

    torch.manual_seed(0)
    module = _module()
    denoiser = module.backbone.denoiser
    base = {k: v.clone() for k, v in denoiser.state_dict().items() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in module.lora_state_dict().items()}
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = module.configure_optimizers()
    batch = _batch()
    for step in range(3):
        loss = module.training_step(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = denoiser.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())  # base weights bit-identical
    lora_after = module.lora_state_dict()
    assert any(not torch.equal(lora_after[k], v) for k, v in lora_before.items())
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora_after.items())

    folder = save_adapter(module, tmp_path)
    assert (folder / "pytorch_lora_weights.safetensors").exists()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([300.0, 700.0])
    module.backbone.remove_capture()
    text = module.backbone.encode_text([["circle"], ["square", "star"]], "a photo of a {}", " and ")
    emb, pooled = text.embeddings
    with torch.no_grad():
        trained = denoiser(x, emb, pooled, t).sample
        with module.adapters(False):
            plain = denoiser(x, emb, pooled, t).sample
    assert not torch.allclose(trained, plain, atol=1e-6)  # the adapters do something
    pipe = StableDiffusion3Pipeline.from_pretrained(ALIASES["miniature_mmdit"], text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(folder))  # the pipeline's own LoRA loader
    with torch.no_grad():
        loaded = pipe.transformer(x, emb, pooled, t).sample
        torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)
        # diffusion.lora: the same adapter fused at load, with its fingerprint in the identity
        fused = SD3Backbone(name="m", pretrained="miniature_mmdit", use_t5=False, t5_tokens=0, lora=str(tmp_path)).load()
        torch.testing.assert_close(fused.transformer(x, emb, pooled, t).sample, trained, rtol=1e-4, atol=1e-5)
    assert fused.identity()["lora"]["fingerprint"]


def test_cached_text_encodings_equal_encoding_the_batch():
    module = _module(text_cache=2)
    names = [["circle", "square"], ["star"], ["circle", "square"]]
    for captions in (False, True):
        cached = module._encode(names, captions)
        again = module._encode(list(reversed(names)), captions)  # from the cache, in another order
        with torch.no_grad():
            if captions:
                direct = module.backbone.encode_captions(["a photo of a circle and square", "a photo of a star"] * 2)
                rows = [0, 1, 0]
            else:
                direct = module.backbone.encode_text(names, "a photo of a {}", " and ")
                rows = [0, 1, 2]
        for got, want in zip(cached.embeddings, direct.embeddings, strict=True):
            torch.testing.assert_close(got, want[rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again.embeddings[0], cached.embeddings[0].flip(0), rtol=0, atol=0)
        if not captions:
            torch.testing.assert_close(cached.token_weights, direct.token_weights)
            assert cached.valid.tolist() == direct.valid.tolist()
    assert len(module._texts) <= 2  # bounded


def test_a_backbone_without_a_training_objective_is_a_clear_error(random_backbone):
    from stableseg_pp.models.magnet import MagnetModule
    from stableseg_pp.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="no training objective .* use an MM-DiT preset"):
        MagnetModule(random_backbone, "x", ["x"])


def test_a_bad_lora_path_is_a_clear_error(tmp_path):
    from stableseg_pp.backbones.sd3_mmdit import SD3Backbone
    from stableseg_pp.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"diffusion.lora=.*no LoRA weights there"):
        SD3Backbone(pretrained="miniature_mmdit", use_t5=False, t5_tokens=0, lora=str(tmp_path))


MAGNET_SMALL = [
    "stage=magnet",
    "diffusion=miniature_mmdit",
    "data.generate.n_train=12",
    "data.generate.n_val=6",
    "crf.workers=1",
    "stage0.n_overlays=1",
    "magnet.lora.rank=4",
    "magnet.train.max_steps=4",
    "magnet.train.batch_size=4",
    "magnet.train.accumulate_grad_batches=1",
    "magnet.train.checkpoint_every=1",
    "magnet.train.val_every=3",
    "magnet.train.val_images=4",
    "magnet.train.lr=1e-3",
    "magnet.train.num_workers=0",
    "magnet.train.log_every=1",
]


@pytest.mark.slow
def test_killed_magnet_training_resumes_and_a_second_run_does_no_work(compose_fit, monkeypatch):
    from stableseg_pp.fit import run
    from stableseg_pp.models.magnet import MagnetModule
    from stableseg_pp.runtime.run_dir import COMPLETE
    from tests.conftest import file_stamps

    steps: list[int] = []

    def on_train_batch_start(self, batch, batch_idx):
        steps.append(self.global_step)
        if self.global_step == 2 and not getattr(self, "_resumed", False):
            raise RuntimeError("killed")

    monkeypatch.setattr(MagnetModule, "on_train_batch_start", on_train_batch_start)
    cfg = compose_fit(*MAGNET_SMALL)
    with pytest.raises(RuntimeError, match="killed"):
        run(cfg)
    out = next(Path(cfg.paths.run_dir).glob("magnet-*"))
    assert (out / "checkpoints" / "last.ckpt").exists() and not (out / COMPLETE).exists() and not (out / "adapter").exists()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and all("lora_" in k for k in ckpt["state_dict"])  # adapters only
    steps.clear()
    monkeypatch.setattr(MagnetModule, "_resumed", True, raising=False)
    assert run(compose_fit(*MAGNET_SMALL))["magnet"] == out
    assert steps == [2, 3]  # steps 0 and 1 were not trained again
    assert (out / COMPLETE).exists() and (out / "adapter" / "pytorch_lora_weights.safetensors").exists()
    metrics = json.loads((out / "metrics.json").read_text())["val"]
    assert metrics["flow_matching_before"] > 0 and metrics["flow_matching_after"] > 0
    logs = (next(out.glob("logs/*/metrics.csv"))).read_text().splitlines()[0]
    assert all(f"train/{part}" in logs for part in ("flow_matching", "mask_dice", "mask_focal"))  # logged apart
    stamps = file_stamps(Path(cfg.paths.run_dir))
    run(compose_fit(*MAGNET_SMALL))
    changed = {k for k, v in file_stamps(Path(cfg.paths.run_dir)).items() if stamps.get(k) != v}
    assert not {k for k in changed if not k.startswith(("hydra", ".locks"))}  # nothing recomputed


def test_the_adapter_key_holds_magnets_settings_not_the_segmenters(compose_fit):
    """On a GPU the trainings' precisions differ per setting: changing the segmenter's must not retrain the adapter."""
    from stableseg_pp.data.description import describe_dataset
    from stableseg_pp.runtime.hashing import config_hash
    from stableseg_pp.stages.magnet import magnet_key
    from stableseg_pp.stages.step import build_backbone

    def key(*overrides: str) -> str:
        cfg = compose_fit("diffusion=miniature_mmdit", "trainer.accelerator=gpu", "data.generate.n_train=2",
                          "data.generate.n_val=1", *overrides)  # fmt: skip
        dataset = describe_dataset(cfg.data, ["train"])
        return config_hash(magnet_key(cfg, dataset, build_backbone(cfg), None))

    base = key("segmenter.train.precision=16-mixed", "magnet.train.precision=bf16-mixed")
    assert key("segmenter.train.precision=bf16-mixed", "magnet.train.precision=bf16-mixed") == base
    assert key("segmenter.train.precision=16-mixed", "magnet.train.precision=bf16-mixed", "magnet.train.log_every=3") == base
    assert key("segmenter.train.precision=16-mixed", "magnet.train.precision=16-mixed") != base
