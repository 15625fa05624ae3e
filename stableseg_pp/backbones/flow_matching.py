"""Noising to a chosen time for the flow-matching families (SD3 / SD3.5, FLUX), shared by their backbones.

Flow matching draws ``x_t = (1 - s) x_0 + s eps`` and trains the transformer to
predict the flow ``eps - x_0``; a time ``t`` in the training schedule's units
(0..1000) is ``s * 1000`` whatever the scheduler's shift (the shift only chooses
which sigmas training and sampling visit).
"""

from __future__ import annotations

import torch


class FlowMatchingNoise:
    """:class:`~stableseg_pp.backbones.base.NoisingBackbone`'s noising, for a backbone class to inherit."""

    def noise_to(self, latents: torch.Tensor, time: float, noise: torch.Tensor) -> torch.Tensor:
        sigma = float(time) / 1000.0
        return ((1.0 - sigma) * latents.float() + sigma * noise.to(latents).float()).to(latents.dtype)

    def prediction_target(self, latents: torch.Tensor, noise: torch.Tensor, time: float) -> torch.Tensor:
        return noise.to(latents) - latents  # the flow (velocity) the transformer is trained to predict

    def time_input(self, time: float, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), float(time), device=device, dtype=torch.float32)
