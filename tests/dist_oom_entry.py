"""`torchrun ... tests/dist_oom_entry.py ARGS`: the sinkscope CLI with a fake out-of-memory error on rank 1 (its
second forward of more than one prompt raises torch.OutOfMemoryError once), for tests/test_distributed.py."""

import os
import sys

import torch

from sinkscope import capture, cli

forward = capture.Capture.forward
calls = {"n": 0}


def flaky(self, batch, **kwargs):
    if os.environ.get("RANK") == "1" and batch is not None and batch.size > 1:
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (fake, rank 1)")
    return forward(self, batch, **kwargs)


capture.Capture.forward = flaky
sys.exit(cli.main(sys.argv[1:]))
