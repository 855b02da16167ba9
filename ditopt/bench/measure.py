"""Running the benchmark: a full-compute reference, then every setting of every method against it.

What each column of a :class:`Row` means is in the package docstring (:mod:`ditopt.bench`).
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ditopt import compiled_graph, sites, zoo
from ditopt.errors import DitoptError
from ditopt.profile import ProfileError
from ditopt.flops import ModuleCost, graph_flops
from ditopt.metrics import psnr, ssim

from .method import Context
from .methods import METHODS

DATA_RANGE = 2.0  # of the zoo's samples, in about [-1, 1]: PSNR and SSIM are computed with it


@dataclass
class Row:
    method: str
    family: str
    setting: str
    compute: float
    speedup: float
    psnr: float
    ssim: float
    accuracy: float
    overhead: bool = False


@dataclass
class BenchResult:
    model: str
    steps: int
    seeds: int
    rows: list[Row]
    failed: dict[str, str] = field(default_factory=dict)  # method -> one-line reason
    date: str = ""
    command: str = ""


_DERIVED = {"compute", "reuse", "reuse_residual", "predict", "skipped"}


def _counted_actions(decisions: dict[str, list[str]]) -> set[str]:
    """Actions whose work is not whole sites run or skipped (share_cfg runs half a batch, partial a
    share of the tokens, window a window of attention): such runs are counted with FlopCounterMode
    around the whole generation, less what full compute spends outside the blocks."""
    return {a for row in decisions.values() for a in row} - _DERIVED


def _executed_block_flops(decisions: dict[str, list[str]], blocks: list[str], per_call: dict[str, float]) -> float:
    """Block FLOPs a ditopt run executed, from its decisions: a block that computes costs its
    FLOPs less those of the sub-sites that reused (the runtime marks the sites inside those
    ``skipped``, so each reused region is counted once)."""
    calls = len(decisions[blocks[0]])
    total = 0.0
    for i in range(calls):
        for b in blocks:
            if decisions[b][i] != "compute":
                continue
            total += per_call[b] - sum(per_call[site] for site, acts in decisions.items()
                                       if site in per_call and site.startswith(b + ".")
                                       and acts[i] not in ("compute", "skipped"))
    return total


def run_bench(model: str = "dit-digits", *, seeds: int = 4, steps: int | None = None,
              methods: Sequence[str] | None = None, progress: bool = True, per_class: int = 1,
              log: Callable[[str], None] | None = None) -> BenchResult:
    """Run the benchmark; see the module docstring for what each column means.

    ``methods``: keys of :data:`METHODS` (default: all). Unknown keys raise a DitoptError naming
    them. A peer that cannot be imported, or fails on this model, lands in ``result.failed``.
    """
    if model not in zoo.list():
        raise DitoptError(f"unknown zoo model {model!r}; known: {', '.join(zoo.list())}")
    keys = list(METHODS) if methods is None else list(methods)
    unknown = [k for k in keys if k not in METHODS]
    if unknown:
        raise DitoptError(f"unknown bench method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if seeds < 1:
        raise DitoptError(f"seeds must be >= 1, got {seeds}")
    say = log or (lambda s: None)

    ref_zoo = zoo.load(model)
    n_steps = int(steps or ref_zoo.steps)
    labels = torch.arange(10).repeat_interleave(per_class)
    x0 = torch.zeros(ref_zoo.sample_shape(1))
    example = dict(hidden_states=x0, timestep=torch.ones(1) * 500, **ref_zoo.make_conditioning(labels[:1]))
    table = sites(ref_zoo.model, **example)
    blocks = [s.name for s in table if s.kind == "block" and s.parent == "stack"]
    counted = [s.name for s in table if s.kind in ("block", "attention", "feedforward")]
    ctx = Context(ref_zoo, n_steps, table)

    # full compute: references, times, and the FLOPs of every site per call
    references = []
    counter = ModuleCost(ref_zoo.model, counted)
    with counter.counting():
        references.append(ref_zoo.sample(labels, seed=0, steps=n_steps))
    per_call = counter.per_call(counter.flops)
    full_block_flops = sum(counter.flops[b] for b in blocks)
    per_call["(outside the blocks)"] = counter.total_flops - full_block_flops  # of one generation
    for seed in range(1, seeds):
        references.append(ref_zoo.sample(labels, seed=seed, steps=n_steps))
    acc_full = sum(ref_zoo.accuracy(r, labels) for r in references) / seeds

    rows = [Row("full", "full", "-", 1.0, 1.0, math.inf, 1.0, acc_full)]
    failed: dict[str, str] = {}
    work = _settings_to_run(keys, n_steps, failed)
    bar = tqdm(work, disable=not progress, desc=f"bench {model}", unit="setting")
    for method, setting in bar:
        bar.set_postfix_str(f"{method.name} {setting.label}")
        label = f"{method.family} {method.name}" if method.family != "ditopt" else f"ditopt {method.name}"
        try:
            row = _run_setting(model, ctx, method, setting, labels, references, full_block_flops, blocks,
                               per_call, label)
        except Exception as exc:  # noqa: BLE001 - a failing peer is reported, the rest still run
            if method.family == "ditopt" and not isinstance(exc, ProfileError):  # ours fail loudly, but
                raise  # a budget this step count cannot meet is reported with the rest
            failed[f"{label} [{setting.label}]"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            say(f"{label} [{setting.label}] failed: {exc}")
            continue
        finally:
            torch._dynamo.reset()  # this setting's model is gone; drop its compiled code
        rows.append(row)
        say(f"{row.method} [{row.setting}] compute {row.compute:.3f} speedup {row.speedup:.2f} "
            f"psnr {row.psnr:.2f} ssim {row.ssim:.3f} acc {row.accuracy:.2f}")
    return BenchResult(model, n_steps, seeds, rows, failed, date=_dt.date.today().isoformat())


def _settings_to_run(keys: Sequence[str], steps: int, failed: dict[str, str]) -> list[tuple]:
    """``(method, setting)`` for every setting of these methods; a method whose module cannot be
    imported, or whose settings cannot be made, lands in ``failed`` instead."""
    work = []
    for key in keys:
        method = METHODS[key]
        if method.requires:
            try:
                __import__(method.requires)
            except Exception as exc:  # noqa: BLE001 - any import failure makes the peer unavailable
                failed[f"{method.family} {method.name}"] = f"cannot import {method.requires}: {exc}"
                continue
        try:
            settings = method.settings(steps)
        except Exception as exc:  # noqa: BLE001
            failed[f"{method.family} {method.name}"] = f"{type(exc).__name__}: {exc}"
            continue
        work += [(method, s) for s in settings]
    return work


def _run_setting(model_name, ctx, method, setting, labels, references, full_block_flops, blocks, per_call,
                 label) -> Row:
    ref_zoo = ctx.zoo
    fresh = zoo.load(model_name)
    applied = setting.apply(fresh.model, ctx)
    seeds = len(references)
    # warm-up (capture and rewrite for ditopt, lazy state for the peers), outside the timing
    applied.before_generation()
    fresh.sample(labels, seed=0, steps=ctx.steps, transformer=applied.transformer)
    t_full = t_method = 0.0
    executed = 0.0
    psnrs, ssims, accs = [], [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        ref_zoo.sample(labels, seed=seed, steps=ctx.steps)
        t_full += time.perf_counter() - t0
        applied.before_generation()
        t0 = time.perf_counter()
        out = fresh.sample(labels, seed=seed, steps=ctx.steps, transformer=applied.transformer)
        t_method += time.perf_counter() - t0
        if applied.decisions is not None and not _counted_actions(applied.decisions()):
            executed += _executed_block_flops(applied.decisions(), blocks, per_call)
        elif applied.decisions is not None:  # share_cfg, partial, window: measured, as the peers are
            applied.before_generation()
            with graph_flops(compiled_graph(applied.transformer).rewritten) as counted:
                counted_out = fresh.sample(labels, seed=seed, steps=ctx.steps, transformer=applied.transformer)
            executed += sum(counted) - per_call["(outside the blocks)"]
            if not torch.equal(counted_out, out):
                raise RuntimeError("the method's output changed between two runs of the same seed")
        else:
            counter = ModuleCost(fresh.model, blocks)
            applied.before_generation()
            with counter.counting():
                counted_out = fresh.sample(labels, seed=seed, steps=ctx.steps, transformer=applied.transformer)
            executed += counter.total()
            if not torch.equal(counted_out, out):
                raise RuntimeError("the method's output changed between two runs of the same seed")
        psnrs.append(psnr(out, references[seed], data_range=DATA_RANGE))
        ssims.append(ssim(out, references[seed], data_range=DATA_RANGE))
        accs.append(ref_zoo.accuracy(out, labels))
    return Row(label, method.family, setting.label, executed / (full_block_flops * seeds), t_full / t_method,
               sum(psnrs) / seeds, sum(ssims) / seeds, sum(accs) / seeds, setting.overhead)
