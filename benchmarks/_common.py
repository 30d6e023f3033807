"""Timing and memory helpers shared by the benchmark scripts (run them as scripts)."""
import argparse
import contextlib
import resource
import statistics
import sys
import time

import torch


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose ``--help`` prints the script's whole docstring, which explains its columns."""
    return argparse.ArgumentParser(description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def step_parser(doc: str) -> argparse.ArgumentParser:
    """The options every training-step benchmark takes: devices, timed and warm-up steps, AMP."""
    parser = benchmark_parser(doc)
    default_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser.add_argument("--device", nargs="+", default=default_devices)
    parser.add_argument("--iters", type=int, default=3, help="timed steps per device")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", action="store_true",
                        help="mixed precision (float16 on CUDA, bfloat16 on the CPU)")
    return parser


def check_devices(devices) -> None:
    if any(d.startswith("cuda") for d in devices) and not torch.cuda.is_available():
        sys.exit("--device cuda was asked for but no GPU is available")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def peak_memory_mib(device: str, baseline: float) -> float:
    """CUDA: max_memory_allocated; CPU: growth of the peak resident set over ``baseline``."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib() - baseline


def time_steps(step, device: str, iters: int, warmup: int) -> dict:
    """Median seconds of ``step(iteration)`` over ``iters`` calls after ``warmup`` calls, the
    peak memory and the last call's return value."""
    return time_interleaved([step], device, iters, warmup)[0]


def time_interleaved(steps, device: str, iters: int, warmup: int) -> list:
    """``time_steps`` for several step functions, called in turn at every iteration, so that
    load from other programs affects all alike; one result per step.

    Peak memory is known for a single step only (None for several, whose models all stay
    loaded): on the CPU the peak resident set only grows, so its baseline is taken before the
    warm-up (the model already loaded); on CUDA the peak counter is reset after the warm-up.
    """
    baseline = peak_rss_mib()
    for iteration in range(warmup):  # allocator, kernels, thread pools
        for step in steps:
            step(iteration)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, results = [[] for _ in steps], [None] * len(steps)
    for iteration in range(warmup, warmup + iters):
        for i, step in enumerate(steps):
            sync(device)
            start = time.perf_counter()
            results[i] = step(iteration)
            sync(device)
            times[i].append(time.perf_counter() - start)
    memory = peak_memory_mib(device, baseline) if len(steps) == 1 else None
    return [{"step": statistics.median(t), "result": r, "memory": memory}
            for t, r in zip(times, results)]


@contextlib.contextmanager
@torch.no_grad()
def norms_from_inputs(module: torch.nn.Module):
    """Inside the block, every norm layer of ``module`` takes its statistics from its input.

    With random weights the activations of a 50-layer RPN backbone grow to thousands and the
    RPN returns no finite proposal; this data-dependent initialisation keeps them of order one,
    so the RPN does its full work (top-k, decoding, NMS) on realistic numbers of boxes.
    """
    def set_stats(norm, args):
        norm.running_mean.copy_(args[0].mean(dim=(0, 2, 3)))
        norm.running_var.copy_(args[0].var(dim=(0, 2, 3)))

    norms = [m for m in module.modules() if hasattr(m, "running_var")]
    handles = [norm.register_forward_pre_hook(set_stats) for norm in norms]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
