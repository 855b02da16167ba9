"""Real diffusers transformer classes built from config at small sizes, with example inputs.

The one list of the models ditopt is tried on without training: the command line
(``ditopt sites wan``, ``ditopt diff``, ``ditopt demo --model random-dit``), the tests and the
speed benchmark read it; weights are random. :func:`build_model` also takes a diffusers class
name or a trained zoo model (``ditopt.zoo``), as the command line's MODEL argument does.

Each builder returns ``(model, kwargs)``; kwargs are the forward's keyword inputs, with the
timestep under ``timestep``.
"""

import torch


def dit():
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                              num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return m.eval(), dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([500, 500]),
                          class_labels=torch.tensor([1, 2]))


def pixart():
    from diffusers import PixArtTransformer2DModel

    m = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=32,
                                 caption_channels=24)
    return m.eval(), dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([500, 500]),
                          encoder_hidden_states=torch.randn(2, 5, 24),
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    m = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                    num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                                    text_embed_dim=32, time_embed_dim=16, max_text_seq_length=6)
    return m.eval(), dict(hidden_states=torch.randn(1, 3, 4, 8, 8), timestep=torch.tensor([500]),
                          encoder_hidden_states=torch.randn(1, 6, 32))


def wan():
    from diffusers import WanTransformer3DModel

    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
                              rope_max_seq_len=32)
    return m.eval(), dict(hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500]),
                          encoder_hidden_states=torch.randn(1, 6, 32))


def hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    m = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                       num_layers=2, num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0,
                                       patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=16,
                                       rope_axes_dim=(4, 6, 6))
    return m.eval(), dict(hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500]),
                          encoder_hidden_states=torch.randn(1, 6, 32), encoder_attention_mask=torch.ones(1, 6),
                          pooled_projections=torch.randn(1, 16), guidance=torch.tensor([3000.0]))


def random_dit(hidden: int = 256, layers: int = 8, sample: int = 32, seed: int = 0):
    """A larger DiTTransformer2DModel (random weights), sized so the blocks dominate the time:
    ``ditopt demo --model random-dit`` and ``tools/bench_speed.py``. Returns the model only."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    heads = max(1, hidden // 64)
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4,
                                 out_channels=4, num_layers=layers, sample_size=sample, patch_size=2,
                                 num_embeds_ada_norm=1000).eval()


MODELS = {"dit": dit, "pixart": pixart, "cogvideox": cogvideox, "wan": wan, "hunyuan": hunyuan}
# The diffusers class each small config builds, by class name (diffusers is imported on first build).
CLASS_NAMES = {"DiTTransformer2DModel": "dit", "PixArtTransformer2DModel": "pixart",
               "CogVideoXTransformer3DModel": "cogvideox", "WanTransformer3DModel": "wan",
               "HunyuanVideoTransformer3DModel": "hunyuan"}


def build(name: str, seed: int = 0):
    """``(model in eval mode, example kwargs)`` for one of :data:`MODELS`.

    Example:
        >>> model, kwargs = build("wan")
        >>> type(model).__name__, sorted(kwargs)
        ('WanTransformer3DModel', ['encoder_hidden_states', 'hidden_states', 'timestep'])
    """
    if name not in MODELS:
        from .errors import DitoptError

        raise DitoptError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name]()


def build_model(name: str):
    """``(model in eval mode, example forward kwargs)`` for a small config, its diffusers class
    name, or a zoo model (example inputs: a batch of 2 for batched CFG, else 1, at timestep 500).

    Example:
        >>> type(build_model("WanTransformer3DModel")[0]).__name__
        'WanTransformer3DModel'
        >>> all(type(build(name)[0]).__name__ == cls for cls, name in CLASS_NAMES.items())
        True
    """
    from . import zoo

    if name in zoo.NAMES:
        loaded = zoo.load(name)
        batch = 2 if loaded.cfg_mode == "batched" else 1
        kwargs = dict(hidden_states=torch.randn(loaded.sample_shape(batch)), timestep=torch.full((batch,), 500.0),
                      **loaded.make_conditioning(list(range(batch))))
        return loaded.model.eval(), kwargs
    name = CLASS_NAMES.get(name, name)
    if name not in MODELS and ":" in name:
        return from_function(name)
    if name not in MODELS:
        from .errors import DitoptError

        raise DitoptError(f"unknown model {name!r}; known: {', '.join([*MODELS, *zoo.NAMES])} "
                          f"(or a class name: {', '.join(CLASS_NAMES)}, or module:function / file.py:function)")
    return build(name)


def from_function(spec: str):
    """``(model in eval mode, kwargs)`` from the user's own function, named ``package.module:function``
    or ``path/to/file.py:function`` and called with no arguments: it returns the model and the
    keyword inputs of one forward call (the timestep under its name). What the command line's
    MODEL takes for a model of one's own.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "mine.py")
        >>> _ = open(path, "w").write("from ditopt.small_models import dit\\ndef build():\\n    return dit()\\n")
        >>> type(from_function(path + ":build")[0]).__name__
        'DiTTransformer2DModel'
        >>> from_function(path + ":nope")
        Traceback (most recent call last):
        ...
        ditopt.errors.DitoptError: ...mine.py:nope: the module has no function 'nope'
    """
    import importlib
    import importlib.util
    import os

    from .errors import DitoptError

    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise DitoptError(f"{spec!r}: expected module:function or file.py:function")
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise DitoptError(f"{spec}: no such file: {target}")
        found = importlib.util.spec_from_file_location(f"ditopt_user_{abs(hash(os.path.abspath(target)))}", target)
        module = importlib.util.module_from_spec(found)
        _user_code(spec, found.loader.exec_module, module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise DitoptError(f"{spec}: cannot import {target!r} ({exc})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise DitoptError(f"{spec}: the module has no function {name!r}")
    built = _user_code(spec, function)
    if not (isinstance(built, (tuple, list)) and len(built) == 2 and isinstance(built[0], torch.nn.Module)
            and isinstance(built[1], dict) and all(isinstance(k, str) for k in built[1])):
        got = type(built).__name__ if not isinstance(built, (tuple, list)) else \
            "(" + ", ".join(type(b).__name__ for b in built) + ")"
        raise DitoptError(f"{spec}: expected it to return (model, dict of forward keyword inputs), got {got}")
    return built[0].eval(), built[1]


def _user_code(spec: str, fn, *args):
    """``fn(*args)``: the user's code; what it raises becomes one line naming where it was raised."""
    import traceback

    from .errors import DitoptError

    try:
        return fn(*args)
    except Exception as exc:
        last = traceback.extract_tb(exc.__traceback__)[-1]
        raise DitoptError(f"{spec} raised {type(exc).__name__}: {exc} (at {last.filename}:{last.lineno})") from None


def timesteps(n, like):
    """``n`` decreasing timesteps shaped like ``like``."""
    return [torch.full_like(like, int(999 - i * (999 / n))) for i in range(n)]
