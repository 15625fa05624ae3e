"""The weight learner finds the informative attention maps on a constructed case."""

from __future__ import annotations

import torch

from stableseg_pp.attention.weights import MapExample, fit_map_weights


def _examples(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        target = torch.zeros(16, 16, dtype=torch.long)
        x, y = torch.randint(0, 8, (2,), generator=g).tolist()
        target[y : y + 6, x : x + 6] = 1
        x2, y2 = torch.randint(8, 12, (2,), generator=g).tolist()
        target[y2 : y2 + 4, x2 : x2 + 4] = 2
        onehot = torch.stack([(target == c).float() for c in (1, 2)])  # (2, 16, 16)
        maps = []
        for quality in (0.9, 0.5, 0.0, 0.0):  # two informative maps, two pure noise
            noise = torch.rand(2, 16, 16, generator=g)
            maps.append(quality * onehot + (1 - quality) * noise)
        target[0, 0] = 255  # an ignored pixel
        out.append(MapExample(maps=torch.stack(maps), target=target))
    return out


def test_learned_weights_rank_informative_maps_first():
    names = ["good", "fair", "noise_a", "noise_b"]
    model, history = fit_map_weights(_examples(), names, background_threshold=0.55, epochs=60, lr=0.1, batch_size=16)
    w = model.as_dict()
    assert abs(sum(w.values()) - 1) < 1e-5
    assert w["good"] > w["fair"] > max(w["noise_a"], w["noise_b"])
    assert history[-1] < history[0]
