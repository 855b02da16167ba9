"""ditopt.zoo: tiny *trained* diffusers transformers for judging caching quality.

Two models, trained in this repository on scikit-learn's digits and shipped as
safetensors in ``ditopt/zoo/weights/`` (no hub, no network):

* ``"dit-digits"``: ``diffusers.DiTTransformer2DModel``, class-conditional
  (``class_labels``; 10 digits + null class 10), on 1x16x16 pixel images
  (patch 2 -> 64 tokens).  CFG runs as ONE batched call per step on the
  batch ``[cond, uncond]``.
* ``"wan-digits"``: ``diffusers.WanTransformer3DModel`` on 1x8x16x16 clips of a
  digit moving in a straight line (patch (1,2,2) -> 64 tokens per frame,
  512 per clip), conditioned through ``encoder_hidden_states`` [B, 4, 32] from
  a learned per-class embedding table (11 rows, row 10 = null).  CFG runs as
  TWO calls per step, conditional first, then unconditional.

Both use flow matching with ``FlowMatchEulerDiscreteScheduler`` (20 steps by
default).  Training scripts: ``tools/train_dit_digits.py`` and
``tools/train_wan_digits.py``, which share their loop (``ditopt/zoo/training.py``)
and data (``ditopt/zoo/digits.py``); figures in ``docs/ZOO.md``.

Example::

    >>> from ditopt import zoo
    >>> zoo.list()
    ['dit-digits', 'wan-digits']
    >>> m = zoo.load("dit-digits")
    >>> x = m.sample([3, 7], seed=0, steps=4)          # [2, 1, 16, 16] in ~[-1, 1]
    >>> tuple(x.shape)
    (2, 1, 16, 16)
    >>> labels = m.classify(m.sample([3, 7], seed=0))  # default 20 steps -> array of 2 labels
    >>> # use an optimised module in place of m.model; it is called exactly like
    >>> # m.model(hidden_states=..., timestep=..., class_labels=..., return_dict=False)[0]
    >>> x2 = m.sample([3, 7], seed=0, steps=4, transformer=m.model)
    >>> bool((x2 == x).all())
    True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .classifier import classify

__all__ = ["ZooModel", "load", "list", "classify", "NAMES"]

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
NAMES = ("dit-digits", "wan-digits")


@dataclass
class ZooModel:
    """A loaded zoo model plus everything needed to sample from it.

    Attributes:
        name: zoo name.
        model: the diffusers transformer, eval mode, float32, CPU.
        scheduler: a fresh diffusers scheduler configured as in training
            (``sample`` makes its own copy per call, so this one stays unused).
        steps: default number of sampling steps.
        guidance_scale: default classifier-free guidance scale.
        cfg_mode: ``"batched"`` (one call on ``[cond, uncond]``) or
            ``"separate"`` (two calls per step: cond, then uncond).
        make_conditioning: ``labels -> dict`` of forward kwargs besides
            ``hidden_states``/``timestep`` (DiT: ``class_labels``; Wan:
            ``encoder_hidden_states``).
        null_conditioning: ``batch -> dict`` of the same kwargs for the
            unconditional branch.
        sample_shape: ``batch -> tuple`` shape of ``hidden_states``.
        config: the JSON metadata shipped with the weights (model config,
            scheduler config, training record).
    """

    name: str
    model: torch.nn.Module
    scheduler: Any
    steps: int
    guidance_scale: float
    cfg_mode: str
    make_conditioning: Callable[[Any], dict]
    null_conditioning: Callable[[int], dict]
    sample_shape: Callable[[int], tuple]
    config: dict = field(default_factory=dict, repr=False)

    def new_scheduler(self):
        """A fresh scheduler instance with the trained configuration."""
        return type(self.scheduler).from_config(self.scheduler.config)

    @torch.no_grad()
    def sample(
        self,
        labels: Sequence[int] | torch.Tensor,
        seed: int,
        steps: int | None = None,
        guidance_scale: float | None = None,
        transformer: Callable | None = None,
    ) -> torch.Tensor:
        """Full-compute CFG sampling; returns the final sample (values ~[-1, 1]).

        ``labels``: digit classes (0..9), one per sample.  ``seed`` fixes the
        initial noise (``torch.Generator().manual_seed(seed)``).  ``transformer``
        replaces ``self.model`` (e.g. an optimised / caching wrapper); it is
        called as ``transformer(hidden_states=x, timestep=t, **cond,
        return_dict=False)[0]`` with ``t`` a float tensor of shape [batch]
        holding ``1000 * sigma``.  Per step: DiT makes one call on the batch
        ``cat([cond, uncond])``; Wan makes two calls, cond first, then uncond.
        """
        net = self.model if transformer is None else transformer
        steps = self.steps if steps is None else int(steps)
        gs = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        b = labels.shape[0]
        sched = self.new_scheduler()
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(int(seed))
        x = torch.randn(self.sample_shape(b), generator=gen, dtype=torch.float32)
        cond = self.make_conditioning(labels)
        uncond = self.null_conditioning(b)
        if self.cfg_mode == "batched":
            both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        for t in sched.timesteps:
            tt = t.to(torch.float32).expand(b)
            if self.cfg_mode == "batched":
                out = net(hidden_states=torch.cat([x, x]), timestep=torch.cat([tt, tt]), **both, return_dict=False)[0]
                v_c, v_u = out.chunk(2)
            else:
                v_c = net(hidden_states=x, timestep=tt, **cond, return_dict=False)[0]
                v_u = net(hidden_states=x, timestep=tt, **uncond, return_dict=False)[0]
            v = v_u + gs * (v_c - v_u)
            x = sched.step(v, t, x, return_dict=False)[0]
        return x

    def classify(self, samples: torch.Tensor):
        """Digit labels of samples from this model: [N] for dit-digits,
        [N, T] (per frame) for wan-digits (numpy int array)."""
        if len(self.sample_shape(1)) == 5:
            return classify(samples, kind="video", digit_size=int(self.config.get("digit_size", 12)))
        return classify(samples, kind="image")


    def accuracy(self, samples: torch.Tensor, labels) -> float:
        """The share of samples (video: frames) :meth:`classify` labels as the digit asked for."""
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        pred = torch.as_tensor(self.classify(samples)).reshape(len(labels), -1)
        return float((pred == labels[:, None]).float().mean())


def _read(name: str) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    base = os.path.join(WEIGHTS_DIR, name)
    with open(base + ".json") as f:
        meta = json.load(f)
    sd = load_file(base + ".safetensors", device="cpu")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    return meta, sd


def _scheduler(meta: dict):
    import diffusers

    cls = getattr(diffusers, meta["scheduler"]["class"])
    return cls(**meta["scheduler"]["config"])


def _load_dit(meta: dict, sd: dict) -> ZooModel:
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(**meta["model_config"])
    model.load_state_dict(sd, strict=True)
    for m in model.modules():  # CFG labels are dropped by the trainer, never by the model
        if m.__class__.__name__ == "LabelEmbedding":
            m.dropout_prob = 0.0
    model = model.float().eval().requires_grad_(False)
    null = int(meta["null_class"])
    size = int(meta["sample_size"])

    def make_conditioning(labels) -> dict:
        return {"class_labels": torch.as_tensor(labels, dtype=torch.long).reshape(-1)}

    def null_conditioning(batch: int) -> dict:
        return {"class_labels": torch.full((int(batch),), null, dtype=torch.long)}

    def sample_shape(batch: int) -> tuple:
        return (int(batch), 1, size, size)

    return ZooModel(
        name="dit-digits",
        model=model,
        scheduler=_scheduler(meta),
        steps=int(meta["default_steps"]),
        guidance_scale=float(meta["default_guidance_scale"]),
        cfg_mode="batched",
        make_conditioning=make_conditioning,
        null_conditioning=null_conditioning,
        sample_shape=sample_shape,
        config=meta,
    )


def _load_wan(meta: dict, sd: dict) -> ZooModel:
    from diffusers import WanTransformer3DModel

    ce = meta["class_embedding"]
    table = sd.pop(ce["key"]).float()
    cfg = dict(meta["model_config"])
    cfg["patch_size"] = tuple(cfg["patch_size"])
    model = WanTransformer3DModel(**cfg)
    model.load_state_dict(sd, strict=True)
    model = model.float().eval().requires_grad_(False)
    null = int(meta["null_class"])
    seq_len, text_dim = int(ce["seq_len"]), int(ce["text_dim"])
    frames, canvas = int(meta["frames"]), int(meta["canvas"])

    def make_conditioning(labels) -> dict:
        lab = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        return {"encoder_hidden_states": table[lab].reshape(-1, seq_len, text_dim).clone()}

    def null_conditioning(batch: int) -> dict:
        return make_conditioning(torch.full((int(batch),), null, dtype=torch.long))

    def sample_shape(batch: int) -> tuple:
        return (int(batch), 1, frames, canvas, canvas)

    zm = ZooModel(
        name="wan-digits",
        model=model,
        scheduler=_scheduler(meta),
        steps=int(meta["default_steps"]),
        guidance_scale=float(meta["default_guidance_scale"]),
        cfg_mode="separate",
        make_conditioning=make_conditioning,
        null_conditioning=null_conditioning,
        sample_shape=sample_shape,
        config=meta,
    )
    zm.class_embedding = table  # [11, seq_len * text_dim]
    return zm


_LOADERS = {"dit-digits": _load_dit, "wan-digits": _load_wan}


def load(name: str) -> ZooModel:
    """Load a zoo model by name (offline; weights ship with the package).

    >>> from ditopt import zoo
    >>> m = zoo.load("wan-digits")
    >>> m.sample_shape(2)
    (2, 1, 8, 16, 16)
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(NAMES)}")
    meta, sd = _read(name)
    return _LOADERS[name](meta, sd)


def list():  # noqa: A001 - the requested public name; shadows the builtin only inside this module
    """Names accepted by :func:`load`."""
    return [*NAMES]
