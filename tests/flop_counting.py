"""Executed FLOPs of a graph module, call by call: ``FlopCounterMode`` entered around each of its
calls (with SDPA's math kernel, which the counter sees through): :func:`ditopt.flops.graph_flops`."""

from __future__ import annotations

from functools import partial

from ditopt.flops import graph_flops

flops_per_call = partial(graph_flops, math_sdpa=True)  # yields a list that gets each call's FLOPs
