"""One profiled call for the benchmarks: wall time against the GPU's kernel time, and the operators
that take it. Far more wall than kernel time means the GPU waits on the CPU (launches, Python)."""
import time

import torch

from utils.config import synchronize


def profiled(fn, device: torch.device, row_limit: int = 12) -> tuple[float, float, int, str]:
    """Run ``fn()`` once under torch.profiler: (wall seconds with the profiler on, seconds of GPU
    kernels, kernel launches, the top ``row_limit`` operators as a table)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    wall = time.perf_counter() - started
    kernels = [e for e in prof.events() if e.device_type.name == 'CUDA']
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6
    table = prof.key_averages().table(sort_by='device_time_total' if device.type == 'cuda' else 'cpu_time_total',
                                      row_limit=row_limit)
    return wall, busy, len(kernels), table
