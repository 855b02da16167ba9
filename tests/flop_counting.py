"""Executed FLOPs of a graph module, call by call: ``FlopCounterMode`` entered around each of its
calls (with SDPA's math kernel, which the counter sees through)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


@contextmanager
def flops_per_call(gm: torch.nn.Module):
    """Yields a list that gets the FLOPs of each call of ``gm`` made inside the block."""
    per_call, active = [], []

    def enter(module, args):
        active[:] = [sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False)]
        for mode in active:
            mode.__enter__()

    def leave(module, args, out):
        for mode in reversed(active):
            mode.__exit__(None, None, None)
        per_call.append(active[1].get_total_flops())

    hooks = [gm.register_forward_pre_hook(enter), gm.register_forward_hook(leave)]
    try:
        yield per_call
    finally:
        for h in hooks:
            h.remove()
