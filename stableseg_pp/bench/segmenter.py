"""Benchmark: DeepLabV3+ training step time, our LightningModule vs a plain PyTorch loop.

Same model, same batch (repeated), same optimizer and poly schedule, CPU or GPU.
The Lightning figure includes everything the Trainer does between steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from stableseg_pp.models.deeplab import DeepLabV3PlusModule


class _StepTimer(L.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int, last: int):
        self.warmup, self.last = warmup, last
        self.start = self.end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.last:
            self.end = time.perf_counter()


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
    loader = DataLoader(TensorDataset(x.repeat(total, 1, 1, 1), y.repeat(total, 1, 1)), batch_size=args.batch)

    def plain_loop() -> float:
        torch.manual_seed(0)
        module = DeepLabV3PlusModule(names, encoder_name=args.encoder).to(device).train()
        opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total) ** 0.9)
        scaler = torch.amp.GradScaler(device, enabled=args.precision == "16-mixed")  # as Lightning's 16-mixed
        for i, (xb, yb) in enumerate(loader):
            if i == args.warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            xb, yb = xb.to(device), yb.to(device)
            with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss = F.cross_entropy(module(xb), yb, ignore_index=255)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    def lightning_loop() -> float:
        torch.manual_seed(0)
        module = DeepLabV3PlusModule(names, encoder_name=args.encoder)
        timer = _StepTimer(args.warmup, total - 1)
        trainer = L.Trainer(
            accelerator=args.accelerator,
            devices=1,
            max_steps=total,
            precision=args.precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        trainer.fit(module, loader)
        return (timer.end - timer.start) / args.steps

    # Alternate the two so that drifts of the machine's speed hit both alike.
    plain_times, lightning_times = [], []
    for _ in range(args.rounds):
        plain_times.append(plain_loop())
        lightning_times.append(lightning_loop())
    plain, lightning = statistics.median(plain_times), statistics.median(lightning_times)
    print(f"DeepLabV3+ ({args.encoder}), batch {args.batch} x {args.size}x{args.size}, {args.accelerator}, "
          f"precision {args.precision} on both sides:")  # fmt: skip
    print(f"  plain PyTorch loop: {1000 * plain:8.1f} ms/step (median of {args.rounds} rounds of {args.steps} steps)")
    print(f"  LightningModule:    {1000 * lightning:8.1f} ms/step")
    print(f"  ratio Lightning / plain: {lightning / plain:.3f}x")
    return {"plain_s": plain, "lightning_s": lightning, "ratio": lightning / plain}
