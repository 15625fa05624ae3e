"""Benchmark: DeepLabV3+ training step time, our LightningModule vs a plain PyTorch loop.

Same model, same batch (repeated), same optimizer and poly schedule, same precision, same loader (pinned memory and
asynchronous copies on a GPU), CPU or GPU. The Lightning side runs with the DeepLabV3+ stage's loop settings (its
progress bar and a CSV logger at ``--log-every``), so its figure includes everything the stage's Trainer does
between steps. A separate, untimed pass counts the host syncs per step of each side: reads of a device value
(``.item()``, ``bool()``), outputs sized by the data (boolean indexing, ``unique``), copies to the host: each
makes the host wait for the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from stableseg_pp.models.deeplab import DeepLabV3PlusModule
from stableseg_pp.runtime.progress import training_loop_settings

# Operators the host must wait for on a GPU: a device scalar read, and outputs whose size depends on the data.
_SCALAR_READS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.equal.default"}
_DATA_SIZED = {"aten.nonzero.default", "aten.masked_select.default", "aten.bincount.default", "aten._unique2.default",
               "aten.unique_dim.default", "aten.unique_consecutive.default"}  # fmt: skip


class HostSyncCounter(TorchDispatchMode):
    """Counts, while ``active``, the operators that make the host wait for the device: scalar reads (``.item()``,
    ``bool()``), operators whose output size depends on the data (boolean indexing, ``nonzero``, ``unique``,
    ``bincount``) and copies from a GPU to the host. On a CPU nothing waits, but the same operators run."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self.active = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active:
            name = str(func)
            if name in _SCALAR_READS:
                self.counts["scalar reads"] += 1
            elif name in _DATA_SIZED or (name == "aten.index.Tensor" and _boolean_index(args)):
                self.counts["data-sized outputs"] += 1
            elif name in ("aten._to_copy.default", "aten.copy_.default") and _device_to_host(args, out):
                self.counts["device -> host copies"] += 1
        return out


def _boolean_index(args) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))


def _device_to_host(args, out) -> bool:
    source = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else args[0]
    target = args[0] if len(args) > 1 else out
    return source.device.type != "cpu" and isinstance(target, torch.Tensor) and target.device.type == "cpu"


class _StepWindow(L.Callback):
    """From the start of batch ``first`` to the end of batch ``last``: wall time (after a device sync on a GPU), and
    ``counter`` active in between."""

    def __init__(self, first: int, last: int, counter: HostSyncCounter | None = None):
        self.first, self.last, self.counter = first, last, counter
        self.start = self.end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.first:
            _sync(pl_module.device)
            self.start = time.perf_counter()
            if self.counter is not None:
                self.counter.active = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.last:
            if self.counter is not None:
                self.counter.active = False
            _sync(pl_module.device)
            self.end = time.perf_counter()


def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m stableseg_pp.bench segmenter", description=__doc__)
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--classes", type=int, default=7)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default=None, help="both sides (default: 32-true on CPU, bf16-mixed on a GPU that has it)")
    p.add_argument("--log-every", type=int, default=20, help="the Lightning side's segmenter.train.log_every")
    args = p.parse_args(argv)
    if args.precision is None:
        gpu_bf16 = args.accelerator == "gpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        args.precision = "bf16-mixed" if gpu_bf16 else ("16-mixed" if args.accelerator == "gpu" else "32-true")
    autocast_dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    names = [f"c{i}" for i in range(args.classes)]
    total = args.steps + args.warmup
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, args.classes, (args.batch, args.size, args.size))
    # As the stage's loaders on a GPU: pinned pages, so that the copies to the device need not wait.
    loader = DataLoader(TensorDataset(x.repeat(total, 1, 1, 1), y.repeat(total, 1, 1)), batch_size=args.batch,
                        pin_memory=device == "cuda")  # fmt: skip

    def plain_loop(counter: HostSyncCounter | None = None) -> float:
        torch.manual_seed(0)
        module = DeepLabV3PlusModule(names, encoder_name=args.encoder).to(device).train()
        opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total) ** 0.9)
        scaler = torch.amp.GradScaler(device, enabled=args.precision == "16-mixed")  # as Lightning's 16-mixed
        for i, (xb, yb) in enumerate(loader):
            if i == args.warmup:
                _sync(device)
                start = time.perf_counter()
                if counter is not None:
                    counter.active = True
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss = F.cross_entropy(module(xb), yb, ignore_index=255)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
        if counter is not None:
            counter.active = False
        _sync(device)
        return (time.perf_counter() - start) / args.steps

    def lightning_loop(logs: str, counter: HostSyncCounter | None = None) -> float:
        torch.manual_seed(0)
        module = DeepLabV3PlusModule(names, encoder_name=args.encoder)
        window = _StepWindow(args.warmup, total - 1, counter)
        loop = training_loop_settings(args.log_every, "--log-every", callbacks=[window])
        trainer = L.Trainer(
            accelerator=args.accelerator,
            devices=1,
            max_steps=total,
            precision=args.precision,
            logger=CSVLogger(logs, name="logs"),
            enable_checkpointing=False,
            enable_model_summary=False,
            **loop,
        )
        trainer.fit(module, loader)
        return (window.end - window.start) / args.steps

    with tempfile.TemporaryDirectory() as logs:
        syncs = {}
        for side, run in (("plain", plain_loop), ("lightning", lambda counter: lightning_loop(logs, counter))):
            with HostSyncCounter() as counter:
                run(counter=counter)
            syncs[side] = {k: v / args.steps for k, v in counter.counts.items()}
        # Alternate the two so that drifts of the machine's speed hit both alike.
        plain_times, lightning_times = [], []
        for _ in range(args.rounds):
            plain_times.append(plain_loop())
            lightning_times.append(lightning_loop(logs))
    plain, lightning = statistics.median(plain_times), statistics.median(lightning_times)
    print(f"DeepLabV3+ ({args.encoder}), batch {args.batch} x {args.size}x{args.size}, {args.accelerator}, "
          f"precision {args.precision} on both sides; Lightning side logs every {args.log_every} steps:")  # fmt: skip
    print(f"  plain PyTorch loop: {1000 * plain:8.1f} ms/step (median of {args.rounds} rounds of {args.steps} steps)")
    print(f"  LightningModule:    {1000 * lightning:8.1f} ms/step")
    print(f"  ratio Lightning / plain: {lightning / plain:.3f}x")
    for side, counts in syncs.items():
        listed = ", ".join(f"{v:.2f} {k}" for k, v in sorted(counts.items())) or "none"
        print(f"  host syncs per step, {side}: {sum(counts.values()):.2f} ({listed})")
    return {"plain_s": plain, "lightning_s": lightning, "ratio": lightning / plain,
            "syncs_per_step": {side: sum(c.values()) for side, c in syncs.items()}}  # fmt: skip
