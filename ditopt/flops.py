"""What each named module of a model costs when it runs: FLOPs or seconds, measured with hooks.

Forward pre/post hooks read a running total (FlopCounterMode's FLOPs, or the clock) when a module
starts and ends, so nested modules and modules that run but skip their work (a cache hook that
returns early) are both counted right: a skipped module adds nothing.

Example:
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> cost = ModuleCost(net, ["0", "2"])
    >>> with cost.counting():
    ...     _ = net(torch.randn(3, 4))
    >>> cost.flops, cost.calls
    ({'0': 192, '2': 96}, {'0': 1, '2': 1})
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["ModuleCost"]


# FlopCounterMode has formulas for SDPA's CUDA kernels only; on CPU the default (flash) kernel
# would count as 0 FLOPs and attention's QK/AV matmuls would be missing from every total.
# Same formula as the CUDA kernels: 4*b*h*s_q*s_k*d (QK and AV), causal masks not discounted.
def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


_CPU_KERNELS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


class ModuleCost:
    """FLOPs (under :meth:`counting`) and seconds (under :meth:`timing`) spent inside each of
    ``names`` (module paths of ``model``), summed over calls; ``calls`` counts the calls."""

    def __init__(self, model, names: Iterable[str]):
        self.modules = {n: model.get_submodule(n) for n in names}
        self.flops = {n: 0 for n in self.modules}
        self.seconds = {n: 0.0 for n in self.modules}
        self.calls = {n: 0 for n in self.modules}

    @contextlib.contextmanager
    def _hooked(self, read: Callable[[], float], into: dict):
        starts: dict[str, list[float]] = {n: [] for n in self.modules}

        def post(n):
            into[n] += read() - starts[n].pop()
            self.calls[n] += 1

        handles = []
        for n, m in self.modules.items():
            handles.append(m.register_forward_pre_hook(lambda mod, a, n=n: starts[n].append(read())))
            handles.append(m.register_forward_hook(lambda mod, a, o, n=n: post(n)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def counting(self):
        """Count FLOPs (matmul-like ops, attention, convolution: FlopCounterMode's set, plus
        SDPA's CPU flash kernel, which FlopCounterMode leaves out)."""
        counter = FlopCounterMode(display=False, custom_mapping=_CPU_KERNELS)
        with counter, self._hooked(counter.get_total_flops, self.flops):
            yield self

    @contextlib.contextmanager
    def timing(self):
        """Measure wall time inside each module."""
        with self._hooked(time.perf_counter, self.seconds):
            yield self

    def per_call(self, what: dict) -> dict:
        return {n: what[n] / max(self.calls[n], 1) for n in what}

    def total(self) -> int:
        return sum(self.flops.values())
