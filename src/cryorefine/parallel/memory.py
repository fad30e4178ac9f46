"""How much memory a device has, and how many items of a batch fit in it."""

from __future__ import annotations

import os

import torch

#: On a CPU, batches larger than this only cost time: fresh pages for big temporaries
#: (sys time) and cache misses; the demo search (512²) took 71 s with 113 views per
#: batch (a 512 MiB budget) and 43 s with 12 (64 MiB).
CPU_BATCH_BYTES = 64 * 2**20


def available_memory_bytes(device: torch.device) -> int:
    """Free memory on `device`: CUDA's free memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def batch_size_for(
    bytes_per_item: int, fixed_bytes: int, device: torch.device, maximum: int
) -> int:
    """Largest batch (1 … maximum) whose working memory fits the device.

    Args:
        bytes_per_item: memory one more item of the batch needs.
        fixed_bytes: memory needed whatever the batch (already allocated or not).
        device: where the batch runs; CUDA gets half of its free memory, a CPU the
            smaller of half the available RAM and CPU_BATCH_BYTES.
        maximum: upper bound (e.g. the number of items left).
    """
    budget = available_memory_bytes(device) // 2 - fixed_bytes
    if device.type != "cuda":
        budget = min(budget, CPU_BATCH_BYTES)
    return int(max(1, min(maximum, budget // max(bytes_per_item, 1))))
