"""Batches made by a thread while the engine computes on the last: on 2 cores, reading ahead without worker processes."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

_END = object()


def in_background(batches: Iterable, engine=None) -> Iterator:
    """``batches`` in order, each next one made by a thread while the caller works on the current one.

    Decoding and transforms (PIL, torch) and the inference engines (ONNX Runtime, OpenVINO, PyTorch) release the GIL,
    so the two overlap. Random augmentation stays deterministic: only this thread draws from torch's generator while
    the engine, in eval mode, draws nothing. One batch ahead, whatever the number of images; an exception in the
    thread is raised here, at its batch. ``engine``: the frozen forward (engine/frozen.py) the batches are for; if it
    computes on threads of its own (opened now), torch's threads go down to one meanwhile (hymenoptera val predict on
    ONNX Runtime, 2 cores: 1.02-1.05 s, against 1.08-1.18 s with torch's 2 threads competing, 1.14-1.19 s with no
    thread ahead, and 1.06-1.11 s opening the engine while the first batch is read with torch's 2 threads)."""
    saved = torch.get_num_threads()
    try:
        if getattr(engine, "own_threads", False):
            torch.set_num_threads(1)
        with ThreadPoolExecutor(1) as pool:
            items = iter(batches)
            upcoming = pool.submit(next, items, _END)
            while (batch := upcoming.result()) is not _END:
                upcoming = pool.submit(next, items, _END)
                yield batch
    finally:
        torch.set_num_threads(saved)


def decoding_workers() -> int:
    """DataLoader worker processes for inference: none on up to 2 cores (the engine's threads and ``in_background``'s
    thread keep them busy, and a worker costs ~0.15 s to start), and the cores past two on larger machines."""
    return max(0, len(os.sched_getaffinity(0)) - 2)
