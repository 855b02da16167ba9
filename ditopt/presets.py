"""Published feature-reuse methods as plan presets. Each returns an ordinary :class:`Plan`.

The site globs are generic (``*`` narrowed by ``kind``), so a preset fits any DiT whose sites
ditopt finds; edit the YAML (``plan.to_yaml()``) to narrow it.
"""

from __future__ import annotations

from .plan import Plan, Rule, When


def fora(interval: int = 2, steps: int = 50, *, warmup: int = 0, level: str = "layer") -> Plan:
    """FORA: compute every ``interval``-th step, reuse cached layer outputs in between.

    Follows Selvaraju et al., "FORA: Fast-Forward Caching in Diffusion Transformer
    Acceleration" (2024): attention and MLP outputs are cached at the computing steps and
    reused at the others. ``level="block"`` reuses whole blocks' residuals instead.
    The first ``warmup`` steps always compute.

    Example:
        >>> fora(interval=3, steps=9).rules[0].step_list(9)
        [1, 2, 4, 5, 7, 8]
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if level not in ("layer", "block"):
        raise ValueError(f"level must be 'layer' or 'block', got {level!r}")
    reuse_steps = tuple(s for s in range(max(1, warmup), steps) if (s - warmup) % interval != 0)
    plan_steps = reuse_steps or None
    if level == "block":
        rules = [Rule(sites=("*",), kind="block", steps=plan_steps, action="reuse_residual")]
    else:
        rules = [Rule(sites=("*",), kind="attention", steps=plan_steps, action="reuse"),
                 Rule(sites=("*",), kind="feedforward", steps=plan_steps, action="reuse")]
    if not reuse_steps:
        rules = [Rule(sites=("*",), kind="block", action="compute")]
    plan = Plan(steps=steps, rules=rules, name=f"fora-{interval}")
    plan.check()
    return plan


def first_block_cache(threshold: float = 0.08, steps: int = 50, *, first: str = "*") -> Plan:
    """First-Block-Cache: the first block always runs; the other blocks reuse their cached
    residuals while the first block's output has changed by less than ``threshold``
    (relative L1, accumulated since the last step that computed).

    Follows the First Block Cache of ParaAttention / diffusers (2024), a simplification of
    TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
    Model", 2024). ``first`` names (or globs) the watched block; the default is the stack's
    first block.

    Example:
        >>> first_block_cache(0.1, steps=20).rules[0].when.below
        0.1
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    plan = Plan(steps=steps, name=f"fbcache-{threshold}", rules=[
        Rule(sites=("*",), kind="block", action="reuse_residual", when=When(of=first, below=float(threshold))),
    ])
    plan.check()
    return plan


def all_compute(steps: int = 50) -> Plan:
    """A plan that computes everything: outputs stay bit-identical to the model's."""
    return Plan(steps=steps, rules=[Rule(sites=("*",), action="compute")], name="all-compute")
