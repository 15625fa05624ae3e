"""A batch's result tensors copied to the host in one transfer.

Per-image ``.cpu()`` calls make the GPU wait for Python once per array (a
stage-0 batch of 16 images with 16 stored maps each made over 300 of them).
:class:`HostBatch` packs every tensor of a batch into one byte buffer on the
device, copies it in one go into pinned host memory (non-blocking on CUDA, an
event marks the end), and hands out numpy views once the copy is done: the
thread that encodes the files waits for it, the thread feeding the GPU does not.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

ALIGN = 8  # bytes: every array starts at a multiple of the widest element size


class HostBatch:
    """Named tensors (all on one device) on the host after one copy.

    Args:
        tensors: name -> tensor (any dtype numpy has, any shape).
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._spec: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        self._event = None
        parts, offset = [], 0
        device = None
        for name, tensor in tensors.items():
            device = tensor.device if device is None else device
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            pad = -data.numel() % ALIGN
            parts.append(torch.nn.functional.pad(data, (0, pad)) if pad else data)
            self._spec[name] = (offset, data.numel(), tensor.dtype, tuple(tensor.shape))
            offset += data.numel() + pad
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
        if flat.device.type == "cuda":
            self._host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
            self._host.copy_(flat, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = flat.cpu()
        self.copies = 1 if parts else 0  # device-to-host transfers this batch took

    @property
    def names(self) -> list[str]:
        return list(self._spec)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every tensor as a numpy array (waits for the copy; views into the one host buffer)."""
        if self._event is not None:
            self._event.synchronize()
        out = {}
        for name, (offset, size, dtype, shape) in self._spec.items():
            out[name] = self._host[offset : offset + size].view(dtype).view(shape).numpy()
        return out
