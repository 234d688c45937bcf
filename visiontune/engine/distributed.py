"""Multi-process training under ``torchrun``: PyTorch's DistributedDataParallel, set up from torchrun's environment.

The conventions, the same for classification and detection:

- ``--batch-size`` is the *global* batch: each of N processes takes batch_size / N images per step, so the
  learning rate, the schedule and the loss curve mean the same on 1 process or on 8.
- The training order is one permutation per (seed, epoch), dealt out to the processes (``DistributedSampler``),
  and each image's augmentation is seeded by (seed, epoch, index): which process draws an image changes nothing.
- Validation is sharded: each process predicts a contiguous slice, the results are gathered in order, so every
  validation image is counted once and every process sees the same metrics.
- Rank 0 alone writes files, logs and prints; a resumed run needs the same number of processes.

Without torchrun (no ``WORLD_SIZE`` above 1 in the environment) every function here is the one-process no-op.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Subset

from ..errors import UserError

log = logging.getLogger("visiontune")


# --------------------------------------------------------------------------------------------- who am I


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA); returns this process's device.

    Reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` as torchrun sets them.
    Idempotent; without torchrun it returns ``device`` unchanged.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device.type}: multi-process training runs on cpu (gloo) or cuda (nccl)")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UserError(
                f"torchrun: local rank {local} but only {torch.cuda.device_count()} CUDA device(s) on this node; lower --nproc-per-node"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_shutdown)
    if not is_main():
        log.setLevel(logging.WARNING)  # rank 0 alone reports progress
    return device


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# --------------------------------------------------------------------------------------------- data


def per_process_batch(batch_size: int, flag: str = "--batch-size") -> int:
    """This process's share of the global batch."""
    n = world_size()
    if batch_size % n:
        raise UserError(
            f"{flag} {batch_size} is the global batch: it must divide evenly over the {n} processes "
            f"(try {max(n, batch_size // n * n)} or {(batch_size // n + 1) * n})"
        )
    return batch_size // n


def epoch_sampler(dataset: Dataset, seed: int, epoch: int, balance_labels: list[int] | None = None):
    """This process's share of ``randperm(len(dataset))`` drawn from ``seed + epoch``; ranks take every N-th index.

    With one process it is exactly ``RandomSampler`` with a generator seeded ``seed + epoch``. With N, batch k of
    every rank together is batch k of the one-process run (the list is padded by repetition to a multiple of N).
    ``balance_labels`` (one class per image): draw as many images with replacement, every class equally likely.
    """
    if balance_labels is not None:
        return _BalancedShare(balance_labels, seed + epoch)
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return sampler


def balanced_draw(labels: torch.Tensor, generator: torch.Generator, count: int | None = None) -> torch.Tensor:
    """``count`` (default: all) indices drawn with replacement, each class equally likely, uniform within a class."""
    per_class = torch.bincount(labels).double()
    weights = 1.0 / per_class[labels]
    return torch.multinomial(weights, count or len(labels), replacement=True, generator=generator)


class _BalancedShare(torch.utils.data.Sampler):
    """``balanced_draw`` seeded by (seed + epoch), padded to a multiple of the processes, every N-th for this rank."""

    def __init__(self, labels: list[int], seed: int):
        n = world_size()
        self.num_samples = -(-len(labels) // n)
        order = balanced_draw(torch.as_tensor(labels), torch.Generator().manual_seed(seed), self.num_samples * n)
        self.indices = order[rank() :: n].tolist()

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples


class SeededPerSample(Dataset):
    """Seeds torch's RNG from (seed, epoch, index) around each ``dataset[index]``, so random augmentation
    depends on the image and the epoch only, not on the process or worker that loads it."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        state = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, np.uint32)
        # the CPU generator alone (what transforms draw from): torch.random.fork_rng + manual_seed cost 0.45 ms an image
        generator = torch.default_generator
        saved = generator.get_state()
        generator.manual_seed(int(state[0]) << 32 | int(state[1]))
        try:
            return self.dataset[index]
        finally:
            generator.set_state(saved)


def split_batches(batches: list[list[int]]) -> list[list[int]]:
    """This process's share of each global batch (every N-th index); a batch smaller than N is left out, by all."""
    n, r = world_size(), rank()
    return [b[r::n] for b in batches if len(b) >= n]


def shard(dataset: Dataset) -> Dataset:
    """This process's contiguous slice of ``dataset``: concatenating the slices in rank order gives it back."""
    n, w, r = len(dataset), world_size(), rank()
    return dataset if w == 1 else Subset(dataset, range(r * n // w, (r + 1) * n // w))


# --------------------------------------------------------------------------------------------- collectives


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every process's ``t`` concatenated along dim 0 in rank order (sizes may differ); the same on every rank."""
    if not is_distributed():
        return t
    dev = _comm_device()
    local = t.detach().to(dev)
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=dev))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).to(t.device)


def gather_objects(obj: Any) -> list:
    """Every process's picklable ``obj``, in rank order (for small things: predictions, counts)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's picklable ``obj`` on every process."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def computed_on_main(compute: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Run ``compute`` on rank 0 alone and send its tensors to every process (the feature cache is built once)."""
    if not is_distributed():
        return compute()
    result = compute() if is_main() else None
    specs = broadcast_object([(tuple(t.shape), t.dtype, t.device.type) for t in result] if is_main() else None)
    dev = _comm_device()
    out = []
    for i, (shape, dtype, where) in enumerate(specs):
        buf = result[i].to(dev) if is_main() else torch.empty(shape, dtype=dtype, device=dev)
        dist.broadcast(buf, src=0)
        out.append(buf.to(result[i].device if is_main() else where))
    return tuple(out)


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any: Ctrl-C reaches the processes a step apart, and they must
    all stop after the same step (one waiting for the others' gradients would hang)."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def reduce_stats(stats: dict) -> dict:
    """Per-process training statistics made global: averaged over processes (each sees the same number of
    images per epoch), except throughputs (``*_per_second``), which add up, and times (``*_seconds``), the slowest.
    Lists of numbers (per-step losses) are averaged element by element."""
    if not is_distributed():
        return stats
    out = dict(stats)
    keys = [k for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    everyone = gather_cat(torch.tensor([[float(stats[k]) for k in keys]], dtype=torch.float64))
    for i, k in enumerate(keys):
        col = everyone[:, i]
        out[k] = (col.sum() if k.endswith("_per_second") else col.max() if k.endswith("_seconds") else col.mean()).item()
    for k, v in stats.items():
        if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
            out[k] = gather_cat(torch.tensor([v], dtype=torch.float64)).mean(0).tolist()
    return out


# --------------------------------------------------------------------------------------------- models

_wrapped: dict[str, Any] = {"key": None, "ddp": None}


def for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel (gradients averaged over processes at each step).

    DDP reduces the parameters that were trainable when it was built, so a new wrapper is made whenever the
    trainable set changes (staged unfreezing); building one also copies rank 0's weights and buffers to all.
    """
    if not is_distributed():
        return model
    key = (id(model), tuple(id(p) for p in model.parameters() if p.requires_grad))
    if _wrapped["key"] != key:
        _wrapped["key"] = _wrapped["ddp"] = None
        gc.collect()  # the old wrapper's gradient hooks go with it
        ids = [device.index] if device.type == "cuda" else None
        _wrapped["ddp"] = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        _wrapped["key"] = key
    return _wrapped["ddp"]


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers (timm's BatchNormAct too) computing their statistics over the global batch.

    Frozen parts stay in eval mode and use their running statistics, so only the trainable part synchronizes.
    """
    if not is_distributed():
        return model
    if device.type != "cuda":
        raise UserError(
            "--sync-bn: PyTorch synchronizes BatchNorm on CUDA only; on CPU train with frozen BatchNorm "
            "(--strategy linear, or partial with the BatchNorm stages frozen) or without --sync-bn"
        )
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every process, so sharded validation matches the saved model."""
    if not is_distributed():
        return
    dev = _comm_device()
    for b in model.buffers():
        tmp = b.detach().to(dev)
        dist.broadcast(tmp, src=0)
        b.data.copy_(tmp.to(b.device))


def check_resume(saved: dict, path) -> None:
    """A run resumes with the number of processes it was started with."""
    before, now = int(saved.get("world_size", 1)), world_size()
    if before != now:
        raise UserError(
            f"--resume: {path} was trained with {before} process(es), this run has {now}; "
            f"resume with torchrun --nproc-per-node/--nnodes giving {before} process(es) in all"
        )
