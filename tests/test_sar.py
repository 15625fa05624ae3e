"""SAR on a constructed case whose answer is known."""

from __future__ import annotations

import torch

from stableseg_pp.methods.sar import sar_layer, sar_probabilities


def _constructed(h=8, w=8, heads=2, d=16, seed=0):
    """Keys and queries that cluster by true class; a CA map that is wrong on a block of pixels."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.zeros(h, w, dtype=torch.long)
    truth[:, 3:6] = 1
    truth[5:, :] = 2
    protos = torch.randn(heads, 3, d, generator=g) * 3
    feats = protos[:, truth.flatten()] + 0.3 * torch.randn(heads, h * w, d, generator=g)  # (heads, N, d)
    noisy = truth.clone()
    noisy[0:2, 0:2] = 1  # wrong labels in a corner
    noisy[6, 6] = 0
    return truth, noisy, feats[None], feats[None]


def test_sar_corrects_a_noisy_ca_map():
    truth, noisy, q, k = _constructed()
    valid = torch.ones(1, 3, dtype=torch.bool)
    probs = sar_layer(q, k, noisy[None], valid)
    assert probs.shape == (1, 3, 8, 8)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 8, 8))
    assert (probs.argmax(1)[0] == truth).all()
    assert not (noisy == truth).all()


def test_sar_gives_absent_and_invalid_classes_zero():
    truth, _, q, k = _constructed()
    labels = truth.clone()
    labels[labels == 2] = 0  # class 2 absent from the CA map
    valid = torch.tensor([[True, True, True, False]])
    probs = sar_layer(q, k, labels[None], valid)
    assert probs[0, 2].abs().max() == 0 and probs[0, 3].abs().max() == 0


def test_sar_probabilities_averages_layers_at_their_own_resolution():
    truth, noisy, q, k = _constructed()
    # a second, coarser layer: 4x4, built by pooling the features
    q2 = q[0].view(2, 8, 8, 16).permute(0, 3, 1, 2)
    q2 = torch.nn.functional.avg_pool2d(q2, 2).permute(0, 2, 3, 1).reshape(1, 2, 16, 16)
    valid = torch.ones(1, 3, dtype=torch.bool)
    layers = [(q, k, (8, 8)), (q2, q2, (4, 4))]
    probs = sar_probabilities(layers, noisy[None], valid, size=(16, 16))
    assert probs.shape == (1, 3, 16, 16)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 16, 16))
    up_truth = truth.repeat_interleave(2, 0).repeat_interleave(2, 1)
    assert (probs.argmax(1)[0] == up_truth).float().mean() > 0.9
