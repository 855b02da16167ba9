"""The ``ditopt`` command line.

    ditopt demo                       FORA on a diffusers DiT: reuse per step, speed, difference
    ditopt sites dit                  the sites ditopt finds in a model
    ditopt plan validate PLAN         check a plan file (and against --model)
"""

from __future__ import annotations

import argparse
import sys

import torch

from .errors import DitoptError

MODELS = ("dit", "pixart", "wan", "cogvideox", "hunyuan")


def _build(name: str):
    """A small diffusers model from config, with example inputs."""
    from diffusers import (CogVideoXTransformer3DModel, DiTTransformer2DModel, HunyuanVideoTransformer3DModel,
                           PixArtTransformer2DModel, WanTransformer3DModel)

    torch.manual_seed(0)
    if name == "dit":
        m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                  num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
        return m, dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([500, 500]),
                       class_labels=torch.tensor([1, 2]))
    if name == "pixart":
        m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                     num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=32,
                                     caption_channels=24)
        return m, dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([500, 500]),
                       encoder_hidden_states=torch.randn(2, 5, 24),
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    if name == "wan":
        m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                  out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                                  rope_max_seq_len=32)
        return m, dict(hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500]),
                       encoder_hidden_states=torch.randn(1, 6, 32))
    if name == "cogvideox":
        m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                        num_layers=2, sample_width=8, sample_height=8, sample_frames=9,
                                        patch_size=2, text_embed_dim=32, time_embed_dim=16, max_text_seq_length=6)
        return m, dict(hidden_states=torch.randn(1, 3, 4, 8, 8), timestep=torch.tensor([500]),
                       encoder_hidden_states=torch.randn(1, 6, 32))
    if name == "hunyuan":
        m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                           attention_head_dim=16, num_layers=2, num_single_layers=2,
                                           num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
                                           text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6))
        return m, dict(hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500]),
                       encoder_hidden_states=torch.randn(1, 6, 32), encoder_attention_mask=torch.ones(1, 6),
                       pooled_projections=torch.randn(1, 16), guidance=torch.tensor([3000.0]))
    raise DitoptError(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def cmd_demo(args) -> int:
    from .demo import format_table, run_demo

    result = run_demo(steps=args.steps, interval=args.interval, hidden=args.hidden, layers=args.layers,
                      repeats=args.repeats)
    print(format_table(result))
    return 0


def cmd_sites(args) -> int:
    from .backend import sites

    model, kwargs = _build(args.model)
    table = sites(model.eval(), **kwargs)
    print(f"{'site':50s} {'kind':12s} {'attn':6s} {'live-outs':>9s} {'residual':>8s}")
    for s in table:
        print(f"{s.name:50s} {s.kind:12s} {s.attention or '':6s} {len(s.live_outs):>9d} "
              f"{'yes' if s.residual_form else 'no':>8s}")
    return 0


def cmd_plan(args) -> int:
    from .backend import sites
    from .plan import Plan

    plan = Plan.load(args.plan)
    if args.action == "show":
        print(plan.to_yaml(), end="")
    if args.model:
        model, kwargs = _build(args.model)
        compiled = plan.compile(sites(model.eval(), **kwargs))
        counts = compiled.action_counts()
        print(f"valid for {args.model}: {len(compiled.actions)} sites reuse at some step; "
              f"(site, step) actions: {counts}")
    elif args.action == "validate":
        print(f"valid: {len(plan.rules)} rules for {plan.steps} steps")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ditopt", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="FORA on a diffusers DiT: reuse per step, speed-up and difference")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--interval", type=int, default=2)
    demo.add_argument("--hidden", type=int, default=256)
    demo.add_argument("--layers", type=int, default=8)
    demo.add_argument("--repeats", type=int, default=2)
    demo.set_defaults(func=cmd_demo)
    s = sub.add_parser("sites", help="list the sites ditopt finds in a model")
    s.add_argument("model", help=f"one of {', '.join(MODELS)} (small config)")
    s.set_defaults(func=cmd_sites)
    p = sub.add_parser("plan", help="show or validate a plan file")
    p.add_argument("action", choices=("show", "validate"))
    p.add_argument("plan", help="a plan YAML file")
    p.add_argument("--model", help="also check it against this model's sites")
    p.set_defaults(func=cmd_plan)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DitoptError as exc:
        print(f"ditopt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
