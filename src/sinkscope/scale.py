"""Scale-out plumbing shared by both command lines: torchrun ranks, each rank's devices, memory limits, offload.

    torchrun --nproc-per-node 4 -m sinkscope --scan --gpus-per-rank 2    # 8 GPUs: 4 ranks x 2 GPUs each
    sinkscope --scan --max-memory 0=20GiB,1=20GiB,cpu=64GiB --offload-folder /scratch/offload

Under torchrun (WORLD_SIZE > 1) `ranks()` initialises torch.distributed (gloo on CPU, NCCL on GPUs), sends the
output of every rank but 0 to /dev/null, and tears the group down at the end. Rank r (local rank on its node) uses
the GPUs r*G .. r*G+G-1 (G = --gpus-per-rank): one GPU directly, several through accelerate's device_map="auto"
limited to that group. --max-memory keys are GPU numbers within the rank's group (0 = its first GPU) or cpu.
"""

from __future__ import annotations

import contextlib
import os
import sys

from . import distributed
from .errors import UsageError


def add_flags(p) -> None:
    g = p.add_argument_group("scale (torchrun, several GPUs, offload; see docs/scale.md)")
    g.add_argument("--gpus-per-rank", type=int, default=1, help="GPUs per torchrun rank (model parallel within it)")
    g.add_argument("--max-memory", default=None, help="per-device memory limit for spreading the model, e.g. "
                                                      "0=20GiB,1=20GiB,cpu=64GiB")
    g.add_argument("--offload-folder", default=None, help="folder for weights offloaded to disk (with --max-memory)")


def parse_max_memory(text: str | None) -> dict | None:
    """'0=20GiB,cpu=64GiB' -> {0: '20GiB', 'cpu': '64GiB'} (a UsageError for anything else)."""
    if not text:
        return None
    out: dict = {}
    for part in text.split(","):
        key, sep, size = part.strip().partition("=")
        key, size = key.strip(), size.strip()
        if not sep or not size or not (key.isdigit() or key in ("cpu", "disk")):
            raise UsageError(f"--max-memory: expected DEVICE=SIZE[,DEVICE=SIZE...] with DEVICE a GPU number or "
                             f"cpu (e.g. 0=20GiB,cpu=64GiB), not {text!r}")
        out[int(key) if key.isdigit() else key] = size
    return out


def check_flags(args) -> None:
    if args.gpus_per_rank < 1:
        raise UsageError(f"--gpus-per-rank must be >= 1, not {args.gpus_per_rank}")
    parse_max_memory(args.max_memory)
    if args.offload_folder is not None and args.max_memory is None:
        raise UsageError("--offload-folder needs --max-memory (the limits decide what is offloaded)")


def load_kwargs(args) -> dict:
    """api.load keyword arguments for this rank: its device(s), memory limits and offload folder."""
    import torch
    mem = parse_max_memory(args.max_memory)
    kw = dict(device=args.device, max_memory=mem, offload_folder=args.offload_folder)
    if args.device == "cpu" or not torch.cuda.is_available() or args.device.startswith("cuda:"):
        return kw                                     # one device as given (a CPU with --max-memory offloads)
    if distributed.world_size() == 1 and args.gpus_per_rank == 1:
        return kw                                     # one process: accelerate spreads over every GPU
    gpus = distributed.rank_devices(args.gpus_per_rank)
    torch.cuda.set_device(gpus[0])
    if len(gpus) == 1 and not mem:
        kw["device"] = f"cuda:{gpus[0]}"
        return kw
    mem = mem or {}
    limits = {g: mem.get(i, f"{torch.cuda.mem_get_info(g)[0] // (1 << 20)}MiB") for i, g in enumerate(gpus)}
    limits.update({k: v for k, v in mem.items() if isinstance(k, str)})
    kw.update(device="auto", max_memory=limits)       # only this rank's GPUs (and CPU/disk as given)
    return kw


@contextlib.contextmanager
def ranks(args):
    """The whole run of one command line: torch.distributed set up under torchrun, quiet ranks > 0, teardown."""
    multi = distributed.setup(getattr(args, "device", "auto"))
    quiet = multi and not distributed.is_main()
    devnull = open(os.devnull, "w") if quiet else None
    try:
        with contextlib.redirect_stdout(devnull or sys.stdout), contextlib.redirect_stderr(devnull or sys.stderr):
            yield multi
    finally:
        if devnull is not None:
            devnull.close()
        if multi:
            distributed.teardown()
