"""What-if study: a token-pooled proxy of the block stack as a control variate for the forecast.

Runs outside the compiler, on the zoo models (issue 16's 35% bar). At a skipped step the model
is also run with its block stack on tokens averaged in groups of ``r`` consecutive tokens (the
stack's residual spread back to every token of its group): a cheap, real look at this step. The
guided velocity is then that proxy plus the forecast (polynomial in the step index, as an
output-level ``predict`` does) of the difference between full model and proxy, which the
computed steps measure: ``v = P_k + T_k(v - P)``. The proxy runs at every step (the computed
ones need it for the difference). Compute: the computed steps plus 20 proxies at their FLOPs
(counted by FlopCounterMode, whole model).

Example (minutes on 2 CPU cores)::

    OMP_NUM_THREADS=1 python tools/study_proxy.py dit-digits 2
"""
import contextlib
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from study_output_forecasts import Sampler, spell  # noqa: E402

from ditopt import zoo  # noqa: E402
from ditopt.metrics import psnr  # noqa: E402


@contextlib.contextmanager
def pooled(model, r: int):
    """Within: the model's block stack runs on tokens averaged in groups of ``r`` (per-token tables,
    such as Wan's rotary one, take each group's first row); the stack's residual is spread back."""
    blocks = list(model.transformer_blocks if hasattr(model, "transformer_blocks") else model.blocks)
    state = {}

    def pool(t):
        b, n, d = t.shape
        return t.reshape(b, n // r, r, d).mean(2)

    def fix(v):
        if torch.is_tensor(v) and v.dim() >= 2 and v.shape[1] == state["n"] and v is not state["x"]:
            return v[:, ::r]
        return tuple(fix(u) for u in v) if isinstance(v, tuple) else v

    def pre(mod, args, kwargs):
        args = list(args)
        h = args[0] if args else kwargs["hidden_states"]
        if mod is blocks[0]:
            state["n"], state["x"], h = h.shape[1], h, pool(h)
        if args:
            args = [h, *map(fix, args[1:])]
        else:
            kwargs = {**kwargs, "hidden_states": h}
        return tuple(args), {k: (v if k == "hidden_states" else fix(v)) for k, v in kwargs.items()}

    def post(mod, args, kwargs, out):
        if mod is not blocks[-1]:
            return out
        x = state["x"]
        o = out if torch.is_tensor(out) else out[0]
        full = x + (o - pool(x)).repeat_interleave(r, dim=1)
        return full if torch.is_tensor(out) else (full, *out[1:])

    handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Proxy(Sampler):
    def guided(self, x, t, cond, uncond, r=None):
        with pooled(self.m.model, r) if r else contextlib.nullcontext():
            vc, vu = self.branches(x, t, cond, uncond)
        return vu + self.m.guidance_scale * (vc - vu)

    @torch.no_grad()
    def run_proxy(self, seed: int, kinds: str, r: int | None, order: int = 1) -> torch.Tensor:
        """``kinds``: F (compute), S (forecast) or P (forecast corrected by the proxy) per step."""
        m, sig = self.m, self.sigmas
        sched = m.new_scheduler()
        sched.set_timesteps(self.steps)
        x = torch.randn(m.sample_shape(10), generator=torch.Generator().manual_seed(seed))
        cond, uncond = m.make_conditioning(torch.arange(10)), m.null_conditioning(10)
        computed, offsets = [], []  # (step, v) and (step, v - proxy)
        for i, t in enumerate(sched.timesteps):
            if kinds[i] == "F":
                v = self.guided(x, t, cond, uncond)
                if r:
                    offsets.append((i, v - self.guided(x, t, cond, uncond, r)))
                computed.append((i, v))
            elif kinds[i] == "P":
                v = self.guided(x, t, cond, uncond, r) + self._forecast(offsets, i, order, (1.0, 1.0))
            else:
                v = self._forecast(computed, i, order, (1.0, 1.0))
            x = x + (sig[i + 1] - sig[i]) * v
        return x


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    name, seeds = argv[0], range(int(argv[1]) if len(argv) > 1 else 1)
    s = Proxy(zoo.load(name), 20)
    m = s.m
    x, t = torch.randn(m.sample_shape(10)), torch.tensor(500.0)
    cond, uncond = m.make_conditioning(torch.arange(10)), m.null_conditioning(10)
    full = flops(lambda: s.guided(x, t, cond, uncond))
    cost = {r: flops(lambda: s.guided(x, t, cond, uncond, r)) / full for r in (2, 4, 8)}
    print(f"{name}, 20 steps, seeds 0-{len(seeds) - 1} x digits 0-9, PSNR (dB) against full compute; proxy FLOPs "
          f"(whole model): " + ", ".join(f"r={r} {c:.3f}" for r, c in cost.items()))
    refs = {sd: s.run_proxy(sd, "F" * 20, None) for sd in seeds}

    def score(kinds, r, order):
        return sum(psnr(s.run_proxy(sd, kinds, r, order), refs[sd]) for sd in seeds) / len(seeds)

    print("| computed steps | order | no proxy | r=2 | r=4 | r=8 |\n|---|---|---|---|---|---|")
    for computed in ("0,2,5,8,11,14,17", "0,2,5,9,13,17", "0,3,7,11,15"):
        kinds = spell(computed, 20)
        for order in (1, 2):
            row = [f"{score(kinds, None, order):.2f} ({kinds.count('F') / 20:.3f})"]
            row += [f"{score(kinds.replace('S', 'P'), r, order):.2f} ({kinds.count('F') / 20 + cost[r]:.3f})"
                    for r in (2, 4, 8)]
            print(f"| {computed} | {order} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
