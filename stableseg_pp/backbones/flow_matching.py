"""What the flow-matching transformer families (SD3 / SD3.5, FLUX) share: noising to a chosen time, their settings.

Flow matching draws ``x_t = (1 - s) x_0 + s eps`` and trains the transformer to
predict the flow ``eps - x_0``; a time ``t`` in the training schedule's units
(0..1000) is ``s * 1000`` whatever the scheduler's shift (the shift only chooses
which sigmas training and sampling visit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stableseg_pp.backbones.base import AttentionSite, AttentionStore, CaptureRequest
from stableseg_pp.backbones.concept_stream import ConceptStream
from stableseg_pp.backbones.joint_capture import DIRECTIONS
from stableseg_pp.backbones.loading import lora_weights_file, parse_dtype
from stableseg_pp.runtime.errors import ConfigError


class FlowMatchingNoise:
    """:class:`~stableseg_pp.backbones.base.NoisingBackbone`'s noising, for a backbone class to inherit."""

    def noise_to(self, latents: torch.Tensor, time: float, noise: torch.Tensor) -> torch.Tensor:
        sigma = float(time) / 1000.0
        return ((1.0 - sigma) * latents.float() + sigma * noise.to(latents).float()).to(latents.dtype)

    def prediction_target(self, latents: torch.Tensor, noise: torch.Tensor, time: float) -> torch.Tensor:
        return noise.to(latents) - latents  # the flow (velocity) the transformer is trained to predict

    def time_input(self, time: float, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), float(time), device=device, dtype=torch.float32)


#: how class prompts condition a joint-attention transformer: one vector per class, or the joined prompt
CONDITIONINGS = ("per_class", "joined")


def whole_number(key: str, value, minimum: int) -> int:
    """``diffusion.<key>`` as a whole number >= ``minimum``, or a one-line error naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"diffusion.{key}={value}: give a whole number >= {minimum}")
    return value


class TransformerSettings:
    """The settings every flow-matching transformer family shares (SD3, FLUX), checked before any weights load, and
    ConceptAttention's stream (``attention_maps=output_space``) that both families carry the same way. A family
    checks its own settings (its T5 length, guidance), then calls :meth:`_set_settings` in its ``__init__``."""

    _concepts: ConceptStream | None = None

    def _set_settings(
        self,
        name: str,
        pretrained: str,
        dtype: str,
        t5_tokens: int,
        conditioning: str,
        attention_maps: str,
        timestep: float,
        add_noise: bool,
        num_inference_steps: int,
        noise_step: int,
        lora: str | None,
    ) -> None:
        if conditioning not in CONDITIONINGS:
            raise ConfigError(f"diffusion.conditioning={conditioning!r}: use one of {', '.join(CONDITIONINGS)}")
        if attention_maps not in DIRECTIONS:
            raise ConfigError(f"diffusion.attention_maps={attention_maps!r}: use one of {', '.join(DIRECTIONS)}")
        steps = whole_number("num_inference_steps", num_inference_steps, 1)
        if not 1 <= whole_number("noise_step", noise_step, 1) <= steps:
            raise ConfigError(f"diffusion.noise_step={noise_step}: give a step between 1 and num_inference_steps={steps}")
        if isinstance(timestep, bool) or not isinstance(timestep, int | float) or not 0 <= timestep <= 1000:
            raise ConfigError(f"diffusion.timestep={timestep}: give the transformer's time, 0 to 1000 (1 = almost clean)")
        self.name = name
        self.pretrained = str(pretrained)
        self.dtype = parse_dtype(dtype)
        self.t5_tokens = int(t5_tokens)
        self.conditioning = conditioning
        self.attention_maps = attention_maps
        self.timestep = float(timestep)
        self.add_noise = bool(add_noise)
        self.num_inference_steps = int(num_inference_steps)
        self.noise_step = int(noise_step)
        self.lora = str(lora) if lora else None
        if self.lora:
            lora_weights_file(self.lora)  # a clear error before any weights load

    @property
    def stochastic(self) -> bool:
        return self.add_noise

    def _concept_path(self, sites: Sequence[AttentionSite], request: CaptureRequest, store: AttentionStore) -> tuple:
        """With ``output_space``: the concept stream for ``store`` hooked on its blocks, and the sites on its path
        (they need the capture processor whether or not they record); otherwise none."""
        if self.attention_maps != "output_space":
            return ()
        self._concepts = ConceptStream.for_store(self._concepts, store)
        return self._concepts.follow(self.transformer, sites, request.class_maps)

    def _remove_concepts(self) -> None:
        if self._concepts is not None:
            self._concepts.remove()


def size_shift(config, image_tokens: int) -> float:
    """``mu`` of a scheduler that shifts with the image size (``use_dynamic_shifting``): diffusers'
    ``calculate_shift`` for ``image_tokens`` tokens with the scheduler's own bounds, as the pipelines call it."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(
        int(image_tokens),
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


class FlowMatchingSampler:
    """:class:`~stableseg_pp.backbones.base.GenerativeBackbone`'s sampler for the flow-matching families (EmerDiff):
    the model's own scheduler (a copy, ``self.scheduler``'s config) with ``steps`` steps, and stateless Euler steps.
    A scheduler that shifts with the image size (``use_dynamic_shifting``, FLUX.1-dev) gets the shift of the latents
    it samples (:meth:`sequence_length`), as the pipelines set it."""

    _sampling: tuple | None = None  # ((scheduler id, steps, image tokens or None), the sampler)

    def sequence_length(self, latents: torch.Tensor) -> int:
        """The number of image tokens the transformer makes of ``latents`` (what a dynamic shift depends on)."""
        raise NotImplementedError

    def _sampler(self, steps: int, latents: torch.Tensor | None):
        config = self.scheduler.config
        dynamic = bool(config.get("use_dynamic_shifting"))
        tokens = None
        if dynamic:  # before any image (a settings check): the shift of the base size, base_image_seq_len
            tokens = self.sequence_length(latents) if latents is not None else config.get("base_image_seq_len", 256)
        key = (id(self.scheduler), steps, tokens)
        if self._sampling is None or self._sampling[0] != key:
            sampler = type(self.scheduler).from_config(config)
            if dynamic:
                sampler.set_timesteps(int(steps), mu=size_shift(config, tokens))
            else:
                sampler.set_timesteps(int(steps))
            self._sampling = (key, sampler)
        return self._sampling[1]

    def sampling_times(self, start: int, steps: int, latents: torch.Tensor | None = None) -> list[float]:
        sampler = self._sampler(int(steps), latents)
        times = [float(t) for t in sampler.timesteps if float(t) <= float(start)]
        if not times:
            raise ConfigError(f"emerdiff.timestep={start}: no step of a {steps}-step schedule is at or before it")
        return times

    def sampler_step(self, prediction: torch.Tensor, time: float, latents: torch.Tensor) -> torch.Tensor:
        """One Euler step of the flow from ``time`` to the schedule's next time (0 after the last): stateless, so any
        number of batches can take the same step."""
        if self._sampling is None:
            raise RuntimeError("sampling_times() sets the schedule before sampler_step()")
        sampler = self._sampling[1]
        index = int((sampler.timesteps.float() - float(time)).abs().argmin())
        sigma, following = float(sampler.sigmas[index]), float(sampler.sigmas[index + 1])
        return (latents.float() + (following - sigma) * prediction.float()).to(latents.dtype)
