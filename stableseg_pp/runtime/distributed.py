"""One process per device, started by ``srun`` or ``torchrun``; every rank runs the whole pipeline.

The process group is set up here, before the first stage, with the cluster
environment Lightning itself would detect (SLURM, torchelastic). The Trainers
of the stages find it initialised and join it; the work between Trainers
(dataset generation, CRF, evaluation, completion records) is either split
across ranks (:func:`shard`) or done by rank 0 while the others wait
(:func:`main_first`, :func:`on_main`), so all ranks see the same finished
folders when they move on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

from omegaconf import OmegaConf

if TYPE_CHECKING:
    from lightning.fabric.plugins.environments import ClusterEnvironment

log = logging.getLogger(__name__)
T = TypeVar("T")


def configured_world_size(trainer) -> int:
    """Ranks a trainer config asks for: ``devices`` (a count or a list) x ``num_nodes``."""
    devices = trainer.get("devices", 1)
    n = len(devices) if isinstance(devices, list | tuple) or OmegaConf.is_list(devices) else int(devices)
    return n * int(trainer.get("num_nodes", 1))


def _dist():
    """``torch.distributed``, imported when first needed (a command's ``--help`` does not wait for torch)."""
    import torch.distributed

    return torch.distributed


def launched_environment() -> ClusterEnvironment | None:
    """The launcher that started this process as one of several (srun or torchrun), if any."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    if SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return SLURMEnvironment(auto_requeue=False)
    return None


def env_rank() -> int:
    """Global rank from the launcher's environment (0 when not launched as several processes)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def setup(accelerator: str = "auto", timeout_minutes: int = 120) -> None:
    """Join the process group when launched as several processes; a no-op otherwise.

    The timeout covers the longest step one rank does alone (rank 0 evaluating
    and writing records) while the others wait at a barrier.
    """
    import torch

    dist = _dist()
    env = launched_environment()
    if env is None or env.world_size() <= 1 or dist.is_initialized():
        return
    use_cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    os.environ["MASTER_ADDR"] = env.main_address
    os.environ["MASTER_PORT"] = str(env.main_port)
    if use_cuda:
        torch.cuda.set_device(env.local_rank())
    log.info("rank %d of %d joins the process group (%s)", env.global_rank(), env.world_size(), backend)
    dist.init_process_group(
        backend, rank=env.global_rank(), world_size=env.world_size(), timeout=timedelta(minutes=timeout_minutes)
    )


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist.is_initialized() else 1


def local_world_size() -> int:
    """How many ranks of this job share this machine (torchrun's ``LOCAL_WORLD_SIZE``, SLURM's tasks per node)."""
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "").split("(")[0]  # SLURM may write "2(x3)"
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    dist = _dist()
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            import torch

            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items`` (every item goes to exactly one rank)."""
    return list(items[rank() :: world_size()])


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first; the others run it after (e.g. find what rank 0 wrote)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only, then wait for it on every rank; returns its result on rank 0."""
    result = fn() if is_main() else None
    barrier()
    return result


def teardown() -> None:
    dist = _dist()
    if dist.is_initialized():
        dist.destroy_process_group()
