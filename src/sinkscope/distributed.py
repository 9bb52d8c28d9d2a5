"""Data-parallel runs on torch.distributed, started by torchrun (sinkscope has no launcher of its own).

    torchrun --nproc-per-node 2 -m sinkscope --scan              # one node: 2 processes (gloo on CPU, NCCL on GPUs)
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
             --nproc-per-node 8 -m sinkscope --scan                # several nodes: torchrun's own rendezvous

Each rank runs its share of the length-sorted batches (batch i goes to rank i mod world size, so shares differ by at
most one batch). What a rank computes is merged with collectives, in one of three exact ways:
  * per-prompt arrays [N, ...] (each prompt is owned by the one rank that ran it): `merge_rows` sums
    where(owned, value, 0) over ranks, which reproduces every owner's value bit for bit;
  * sums and counts: `all_sum` (float64);
  * streaming mean/variance states: `gather` then Chan's merge in rank order (stats.MeanVar.merge).
Rank 0 alone prints, shows progress bars and writes files. Without torchrun (no WORLD_SIZE), every function
here is the identity and nothing is initialised.
"""

from __future__ import annotations

import os
from typing import Sequence, TypeVar

import torch

T = TypeVar("T")


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_is_main() -> bool:
    """Rank 0 by torchrun's environment (also before setup and after teardown): who reports errors."""
    return os.environ.get("RANK", "0") == "0"


def setup(device: str = "auto") -> bool:
    """Initialise the process group from torchrun's environment (if launched by torchrun with more than one
    process and not yet initialised). NCCL when this rank uses a CUDA device, gloo otherwise. Returns whether
    this process is part of a multi-process run."""
    import torch.distributed as dist
    if env_world_size() <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return True


def teardown() -> None:
    d = _dist()
    if d is not None:
        d.destroy_process_group()


def rank() -> int:
    d = _dist()
    return d.get_rank() if d is not None else 0


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d is not None else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_devices(gpus_per_rank: int = 1) -> list[int]:
    """The CUDA devices of this rank on its node: a contiguous group of `gpus_per_rank` (data x model parallel)."""
    start = local_rank() * gpus_per_rank
    n = torch.cuda.device_count()
    if start + gpus_per_rank > n:
        raise RuntimeError(f"rank {local_rank()} needs GPUs {start}..{start + gpus_per_rank - 1} but this node has {n}")
    return list(range(start, start + gpus_per_rank))


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share: items rank, rank + W, rank + 2W, ... (shares differ by at most one item)."""
    return list(items[rank()::world_size()])


def _collective_device(t: torch.Tensor) -> torch.device:
    d = _dist()
    return torch.device("cuda", torch.cuda.current_device()) if d.get_backend() == "nccl" else torch.device("cpu")


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over ranks (a new tensor on t's device; the identity in a single process)."""
    d = _dist()
    if d is None:
        return t
    buf = t.detach().to(_collective_device(t)).clone()
    d.all_reduce(buf, op=d.ReduceOp.SUM)
    return buf.to(t.device)


def all_max(t: torch.Tensor) -> torch.Tensor:
    d = _dist()
    if d is None:
        return t
    buf = t.detach().to(_collective_device(t)).clone()
    d.all_reduce(buf, op=d.ReduceOp.MAX)
    return buf.to(t.device)


def merge_rows(t: torch.Tensor, owned: torch.Tensor) -> torch.Tensor:
    """Per-prompt array t [N, ...] where this rank filled the rows `owned` [N] bool (others hold anything, e.g.
    NaN): every row from its owner. Exact: each row is its owner's value plus zeros (NaN rows stay NaN)."""
    d = _dist()
    if d is None:
        return t
    assert owned.shape == t.shape[:1], (tuple(owned.shape), tuple(t.shape))
    mask = owned.to(t.device).view(-1, *([1] * (t.dim() - 1)))
    return all_sum(torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=t.device)))


def gather(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] in a single process."""
    d = _dist()
    if d is None:
        return [obj]
    out = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def barrier() -> None:
    d = _dist()
    if d is not None:
        d.barrier()


def merge_prompt_arrays(arrays: dict[str, torch.Tensor], owned: torch.Tensor,
                        fill: float = float("nan")) -> dict[str, torch.Tensor]:
    """Per-prompt arrays {name: [N, ...]} filled by each rank for the prompts it owns (`owned` [N] bool): every
    rank gets every array whole. Names or shapes a rank never made (it ran no batch) are filled with `fill`
    first; the collectives run in sorted-name order on every rank."""
    if _dist() is None:
        return arrays
    specs: dict = {}
    for part in gather({k: (tuple(v.shape), str(v.dtype)) for k, v in arrays.items()}):
        specs.update(part)
    out = {}
    for name in sorted(specs):
        shape, dtype = specs[name]
        t = arrays.get(name)
        if t is None:
            t = torch.full(shape, fill, dtype=getattr(torch, dtype.replace("torch.", "")))
        out[name] = merge_rows(t, owned)
    return out


def all_min_int(value: int) -> int:
    """The smallest `value` over ranks (e.g. a batch size every rank must share)."""
    return int(-all_max(torch.tensor([-int(value)], dtype=torch.int64))[0])


def merge_mean_vars(accs: Sequence) -> list:
    """stats.MeanVar accumulators (the same list on every rank) merged over ranks with Chan's parallel algorithm,
    in rank order (float64). The identity in a single process."""
    if _dist() is None:
        return list(accs)
    from .stats import MeanVar
    states = gather([(a._n, a._mean, a._m2) for a in accs])   # (count, mean, M2): MeanVar's own state
    out = []
    for i, a in enumerate(accs):
        m = MeanVar(a.shape)
        for part in states:
            n_b, mean_b, m2_b = part[i]
            if not n_b:
                continue
            n = m._n + n_b
            delta = mean_b - m._mean
            m._mean = m._mean + delta * (n_b / n)
            m._m2 = m._m2 + m2_b + delta ** 2 * (m._n * n_b / n)
            m._n = n
        out.append(m)
    return out
