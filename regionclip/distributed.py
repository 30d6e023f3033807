"""Process launch (one or many GPUs and machines, or torchrun) and the few collectives we use."""
import os
import socket
from datetime import timedelta
from typing import Any, Callable, List, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_gather(obj: Any) -> List[Any]:
    """Every process's ``obj`` (any picklable object), in rank order."""
    if get_world_size() == 1:
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _run_in_group(main_func: Callable, args: Sequence, local_rank: int, **init_kwargs) -> None:
    """Join the process group (``init_kwargs``: its rendezvous, else the environment's), pin
    this process's GPU, run ``main_func(*args)`` after a barrier, and leave the group."""
    dist.init_process_group(_backend(), timeout=timedelta(minutes=30), **init_kwargs)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    try:
        synchronize()
        main_func(*args)
    finally:
        dist.destroy_process_group()


def _worker(local_rank, main_func, args, num_gpus, num_machines, machine_rank, dist_url):
    os.environ["LOCAL_RANK"] = str(local_rank)
    _run_in_group(main_func, args, local_rank, init_method=dist_url,
                  world_size=num_gpus * num_machines, rank=machine_rank * num_gpus + local_rank)


def launch(
    main_func: Callable,
    num_gpus_per_machine: int = 1,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = "auto",
    args: Sequence = (),
) -> None:
    """Run ``main_func(*args)`` in one process per GPU on every machine.

    Under torchrun (``RANK``/``WORLD_SIZE`` set) the process group is taken from the
    environment and the flags are ignored. On a machine without GPUs, ``num_gpus_per_machine``
    counts CPU processes (gloo), which is how the multi-process paths are tested.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        _run_in_group(main_func, args, get_local_rank())
        return
    world_size = num_gpus_per_machine * num_machines
    if world_size == 1:
        main_func(*args)
        return
    if dist_url == "auto":
        if num_machines > 1:
            raise ValueError("--dist-url auto works on one machine only; pass tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.start_processes(
        _worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, args, num_gpus_per_machine, num_machines, machine_rank, dist_url),
        daemon=False,
        start_method="spawn",
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
