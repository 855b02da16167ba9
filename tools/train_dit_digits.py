#!/usr/bin/env python
"""Train a tiny class-conditional ``diffusers.DiTTransformer2DModel`` on sklearn digits.

The model works directly on pixels (no VAE): the 8x8 digits are upsampled
bilinearly to 16x16, scaled to [-1, 1] and used as 1-channel images.  With
``patch_size=2`` that is 64 tokens per image.

Objective: rectified flow / flow matching (the convention of diffusers'
``FlowMatchEulerDiscreteScheduler``):

    x_t = (1 - s) * x0 + s * noise,   target = noise - x0,   timestep = 1000 * s

The loop (AdamW, warm-up and cosine learning rate, EMA) is ``ditopt/zoo/training.py``, shared
with ``tools/train_wan_digits.py``; the data is ``ditopt/zoo/digits.py``.

Class conditioning uses ``num_embeds_ada_norm=11``: labels 0..9 are the digits
and label 10 is the *null* class used for classifier-free guidance; labels are
replaced by 10 with probability ``--p-uncond`` (0.1) during training.

Note: diffusers' ``LabelEmbedding`` allocates one extra row (index 11) and, in
``train()`` mode, would drop labels to index 11 on its own, independently in
every block.  We disable that (``dropout_prob = 0``) and do the dropping
ourselves so the null class is 10 everywhere; row 11 is never used.

Training is deterministic given ``--seed`` and ``--steps`` (single thread).
``--minutes`` is only a safety cap: if it triggers, the run stops early (and
the result then depends on machine speed; the metadata records it).

Example::

    python tools/train_dit_digits.py --steps 3000 --seed 0 \
        --out ditopt/zoo/weights/dit-digits
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ditopt.zoo.digits import digits_16
from ditopt.zoo.training import NULL_CLASS, TrainConfig, drop_labels, flow_matching, parameter_count, train


def build_model(args) -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=args.heads,
        attention_head_dim=args.head_dim,
        in_channels=1,
        out_channels=1,
        num_layers=args.layers,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=NULL_CLASS + 1,
        norm_num_groups=1,
    )
    # DiT-paper style init: adaLN-zero modulation and the output layer start at 0.
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
    torch.nn.init.zeros_(model.proj_out_1.weight)
    torch.nn.init.zeros_(model.proj_out_1.bias)
    torch.nn.init.zeros_(model.proj_out_2.weight)
    torch.nn.init.zeros_(model.proj_out_2.bias)
    # We do the CFG label dropping ourselves (to class 10), see module docstring.
    for m in model.modules():
        if m.__class__.__name__ == "LabelEmbedding":
            m.dropout_prob = 0.0
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    p.add_argument("--minutes", type=float, default=30.0, help="wall-clock safety cap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ditopt/zoo/weights/dit-digits", help="output path without extension")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=24)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fp16", action="store_true", default=True, help="store weights as float16")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x_all, y_all = digits_16()
    n = x_all.shape[0]
    model = build_model(args)
    model.train()
    nparams = parameter_count([model])
    print(f"params: {nparams / 1e6:.3f}M, data: {n} images")

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        x0 = x_all[idx]
        b = x0.shape[0]
        y = drop_labels(y_all[idx], args.p_uncond, gen)
        noise = torch.randn(x0.shape, generator=gen)
        # logit-normal sigma sampling (SD3 style), mixed with uniform for coverage
        s = torch.sigmoid(torch.randn(b, generator=gen))
        u = torch.rand(b, generator=gen)
        s = torch.where(torch.rand(b, generator=gen) < 0.2, u, s)
        xt, target = flow_matching(x0, noise, s)
        pred = model(hidden_states=xt, timestep=s * 1000.0, class_labels=y, return_dict=False)[0]
        return F.mse_loss(pred, target)

    cfg = TrainConfig(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, ema=args.ema,
                      minutes=args.minutes, log_every=50, loss_window=200, name="dit-digits")
    run = train([model], loss_of, n, gen, cfg)
    save(run.ema[0], args, run.steps_done, run.seconds, run.final_loss, run.stopped_early, nparams)


def save(ema, args, steps_done, elapsed, final_loss, stopped_early, nparams) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in ema.state_dict().items()}
    if args.fp16:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    save_file(sd, args.out + ".safetensors")
    meta = {
        "name": "dit-digits",
        "class": "DiTTransformer2DModel",
        "model_config": {k: v for k, v in dict(ema.config).items() if not k.startswith("_")},
        "scheduler": {
            "class": "FlowMatchEulerDiscreteScheduler",
            "config": {"num_train_timesteps": 1000, "shift": 1.0},
        },
        "objective": "flow matching (x_t=(1-s)x0+s*eps, target eps-x0, timestep=1000*s)",
        "null_class": NULL_CLASS,
        "num_classes": 10,
        "default_steps": 20,
        "default_guidance_scale": 4.0,
        "sample_size": 16,
        "data": "sklearn digits 8x8 -> bilinear 16x16, [-1,1]",
        "training": {
            "script": "tools/train_dit_digits.py",
            "args": vars(args),
            "steps_done": steps_done,
            "stopped_early_by_time_cap": stopped_early,
            "minutes": round(elapsed / 60, 2),
            "final_loss_mean_last200": round(final_loss, 5),
            "weights": "EMA",
            "params": nparams,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
    }
    import diffusers

    meta["training"]["diffusers"] = diffusers.__version__
    with open(args.out + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    print("saved", args.out + ".safetensors", args.out + ".json")


if __name__ == "__main__":
    main()
