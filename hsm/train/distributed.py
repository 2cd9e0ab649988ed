"""The one module that touches ``torch.distributed``. In a single process every
collective here is a no-op, so callers never branch on the topology.
"""

from __future__ import annotations

import os

from hsm.world import World

__all__ = ["current_world", "is_initialized", "init_from_launcher", "local_device", "barrier", "broadcast_bytes",
           "all_gather_bytes", "all_reduce_sum", "all_reduce_max", "on_main", "destroy_process_group"]


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def current_world() -> World:
    """This process's rank and world size (from the process group, else the launcher's env, else 0/1)."""
    if is_initialized():
        import torch.distributed as dist

        return World(dist.get_rank(), dist.get_world_size())
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def init_from_launcher() -> bool:
    """Join the process group the launcher describes in the environment (NCCL on GPUs, else gloo).

    For commands that run outside a Trainer (``hsm eval run``); the Trainer joins it itself. Returns
    whether this call created the group (nothing to do in one process or when it exists).
    """
    if is_initialized() or current_world().world_size <= 1:  # the launcher's WORLD_SIZE
        return False
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def local_device() -> str:
    """This process's device: its GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    import torch

    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def _device():
    """Where collectives run: the current GPU under NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def destroy_process_group() -> None:
    """Tear down the process group at the end of a successful run, on every rank (nothing in one process).

    The ranks meet at a barrier first: a rank that tears gloo down while a peer is still busy (rank 0 scoring
    after the last all-gather) can abort in gloo's threads ("terminate called without an active exception"),
    and so can a rank that exits without tearing it down at all. Call it only when every rank got here: after
    an exception on one rank the others would wait at the barrier until the process group's timeout.
    """
    if is_initialized():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        import torch.distributed as dist

        dist.barrier()


def broadcast_bytes(payload: bytes | None, src: int = 0) -> bytes:
    """Send ``payload`` from rank ``src`` to every rank, as a uint8 tensor (no pickle)."""
    if not is_initialized():
        return payload or b""
    import torch
    import torch.distributed as dist

    device = _device()
    size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.long, device=device)
    dist.broadcast(size, src=src)
    buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if dist.get_rank() == src and payload:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, src=src)
    return bytes(buffer.cpu().numpy().tobytes())


def all_gather_bytes(payload: bytes) -> list[bytes]:
    """Every rank's ``payload``, in rank order, on every rank (uint8 tensors, no pickle)."""
    if not is_initialized():
        return [payload]
    import torch
    import torch.distributed as dist

    device = _device()
    world_size = dist.get_world_size()
    size = torch.tensor([len(payload)], dtype=torch.long, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    dist.all_gather(sizes, size)
    longest = max(int(s.item()) for s in sizes)
    buffer = torch.zeros(longest, dtype=torch.uint8, device=device)
    if payload:
        buffer[: len(payload)].copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    gathered = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world_size)]
    dist.all_gather(gathered, buffer)
    return [bytes(g[: int(s.item())].cpu().numpy().tobytes()) for g, s in zip(gathered, sizes)]


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over ranks (the value itself in one process)."""
    if not is_initialized():
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.long, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_reduce_sum(values):
    """Element-wise sum of a float numpy array over ranks (the array itself in one process)."""
    if not is_initialized():
        return values
    import numpy as np
    import torch
    import torch.distributed as dist

    tensor = torch.as_tensor(np.asarray(values, dtype=np.float64), device=_device())
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def on_main(world: World) -> bool:
    """The guard for rank-0-only side effects."""
    return world.rank == 0
