"""The profiler's recorder and the ``ditopt::observe`` op that feeds it.

Per (site, step, CFG branch) the recorder keeps: the relative L1 change and the cosine
similarity of the site's output and of its residual (output - input) against the previous step
of the same branch, and a fixed random subsample of the residual (of the output for sites
without residual form), from which a planner can replay what reuse or a forecast would have
cost at any step. With CFG batched into one call (``batched_cfg``) the cond-vs-uncond
difference compares the two halves of the batch. The metrics are estimated on that fixed subsample of elements (``keep``, 4096
by default), which keeps observing cheap next to the site's own work. At the second branch of a step it also records the relative L1 difference
between the branches (cond vs uncond).
"""

from __future__ import annotations

import torch

from .session import get_runtime

METRICS = ("rel_l1", "cos", "rel_l1_residual", "cos_residual", "cfg_diff")


def _rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)))


class ShapeChangeError(ValueError):
    """A site observed at another output shape than at its first call (the profiler raises it as a
    ProfileError)."""


class Recorder:
    """Collects observations of one calibration run (see the module docstring).

    Example:
        >>> rec = Recorder(keep=4)
        >>> rec.observe("b", torch.ones(8), torch.zeros(8), step=0, branch=0)
        >>> rec.observe("b", 2 * torch.ones(8), torch.zeros(8), step=1, branch=0)
        >>> rec.values[("rel_l1", "b", 1, 0)]   # |2 - 1| / |1|
        1.0
    """

    def __init__(self, keep: int = 4096, seed: int = 0, batched_cfg: bool = False):
        self.keep = keep
        self.seed = seed
        self.batched_cfg = batched_cfg  # CFG as one call on [cond, uncond]: compare the batch halves
        self._half_index: dict[str, torch.Tensor] = {}
        self.values: dict[tuple[str, str, int, int], float] = {}
        self.samples: dict[tuple[str, int, int], torch.Tensor] = {}
        self.residual_form: dict[str, bool] = {}
        self._index: dict[str, torch.Tensor] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._prev: dict[tuple[str, int], tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._branch0: dict[tuple[str, int], torch.Tensor] = {}
        self.max_step = -1
        self.max_branch = -1

    def observe(self, site: str, out: torch.Tensor, inp: torch.Tensor, step: int, branch: int) -> None:
        has_residual = inp is not out and inp.shape == out.shape
        flat_out = out.detach().reshape(-1)
        if site not in self._index:
            g = torch.Generator().manual_seed(self.seed)
            n = flat_out.numel()
            self._index[site] = torch.randperm(n, generator=g)[: min(self.keep, n)].sort().values
            self._shape[site] = tuple(out.shape)
        if tuple(out.shape) != self._shape[site]:  # the subsample indexes the first call's elements
            raise ShapeChangeError(f"site {site} gave an output of shape {tuple(out.shape)} at step {step}, "
                                   f"{self._shape[site]} at its first call: a calibration run must keep one "
                                   f"input shape (batch, resolution, frames, text length) throughout")
        index = self._index[site]
        o = flat_out[index].float()  # the metrics are estimated on the same fixed subsample
        r = o - inp.detach().reshape(-1)[index].float() if has_residual else o
        self.residual_form[site] = has_residual
        self.max_step = max(self.max_step, step)
        self.max_branch = max(self.max_branch, branch)
        self.samples[(site, step, branch)] = r
        prev = self._prev.get((site, branch))
        if prev is not None and prev[0] < step:
            _, p_out, p_res = prev
            self.values[("rel_l1", site, step, branch)] = _rel_l1(o, p_out)
            self.values[("cos", site, step, branch)] = _cos(o, p_out)
            self.values[("rel_l1_residual", site, step, branch)] = _rel_l1(r, p_res)
            self.values[("cos_residual", site, step, branch)] = _cos(r, p_res)
        self._prev[(site, branch)] = (step, o, r)
        if self.batched_cfg and out.shape[0] % 2 == 0 and out.shape[0] >= 2:
            halves = out.detach().reshape(2, -1)
            if site not in self._half_index:
                g = torch.Generator().manual_seed(self.seed + 1)
                self._half_index[site] = torch.randperm(halves.shape[1], generator=g)[: self.keep]
            h = halves[:, self._half_index[site]].float()
            self.values[("cfg_diff", site, step, branch)] = _rel_l1(h[1], h[0])
        elif branch == 0:
            self._branch0[(site, step)] = o
        elif branch == 1:
            first = self._branch0.pop((site, step), None)
            if first is not None:
                self.values[("cfg_diff", site, step, 0)] = _rel_l1(o, first)


@torch.library.custom_op("ditopt::observe", mutates_args=("token",))
def observe(token: torch.Tensor, out: torch.Tensor, inp: torch.Tensor, rid: int, graph: int, site: str) -> None:
    """Hand a site's output and input to the runtime's recorder (profiling graphs only)."""
    token.add_(1)
    rt = get_runtime(rid)
    if rt.recorder is not None:
        rt.recorder.observe(site, out, inp, rt.state.step, rt.state.branch)


@observe.register_fake
def _(token, out, inp, rid, graph, site):
    return None


__all__ = ["METRICS", "Recorder", "ShapeChangeError", "observe"]
