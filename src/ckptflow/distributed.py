"""Which rank this process is under torchrun, and the barrier that makes a DDP checkpoint whole.

torchrun sets RANK / WORLD_SIZE in every worker; a process started any other way is rank 0
of a world of 1. Plain environment reads: nothing here imports torch until a barrier is needed.
"""

from __future__ import annotations

import os

__all__ = ["destroy_process_group", "init_process_group", "is_main_process", "rank", "wait_for_all_ranks", "world_size"]

# Set by torchrun in each worker (torch.distributed.run).
_RANK_ENV = "RANK"
_WORLD_SIZE_ENV = "WORLD_SIZE"


def rank() -> int:
    return int(os.environ.get(_RANK_ENV, "0"))


def world_size() -> int:
    return int(os.environ.get(_WORLD_SIZE_ENV, "1"))


def is_main_process() -> bool:
    """Rank 0: the only process that touches the ledger (begin, commit, heartbeat, retention)."""
    return rank() == 0


def wait_for_all_ranks() -> None:
    """Block until every rank reaches this point (a no-op in a single process).

    Bounded by the process group's timeout (HF `ddp_timeout`): a rank that never arrives
    makes the others raise instead of waiting forever.
    """
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def init_process_group(timeout_seconds: int) -> None:
    """Under torchrun on CPU: start the gloo process group with our timeout before HF does.

    HF passes `ddp_timeout` to accelerate only on GPU; on CPU (use_cpu) it is dropped and a
    hung rank would hold the others for gloo's default 30 minutes. accelerate reuses a group
    that already exists. With CUDA, HF's own nccl setup (device per rank, timeout) is kept.
    """
    if world_size() <= 1:
        return
    import datetime

    import torch
    import torch.distributed as dist

    if torch.cuda.is_available() or dist.is_initialized():
        return
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_seconds))


def destroy_process_group() -> None:
    """Shut this rank's process group down before the interpreter does (a no-op in a single process).

    A gloo group left to interpreter finalization can abort the process (SIGABRT: its worker
    threads still hold tensors whose release needs the GIL), which torchrun reports as a failed
    chunk although training finished; see pytorch/pytorch#179291.
    """
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
