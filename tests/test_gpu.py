"""On a CUDA device (skipped without one): a static plan's steady state makes no device-to-host
copy, eager and compiled, once the step is told (``ditopt.step_callback``), and the compiled
path matches the eager one there. ``torch.cuda.set_sync_debug_mode("error")`` turns any
synchronising copy into an error."""

from __future__ import annotations

import pytest
import torch

import ditopt
from ditopt.small_models import MODELS

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a lent GPU)")]

STEPS = 4


def _generation(model, kwargs, timesteps, texts, callback):
    outs = []
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            for text in texts:
                outs.append(model(**{**kwargs, "timestep": t, "encoder_hidden_states": text}, return_dict=False)[0])
            callback(i, None, None)
    return outs


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_static_plan_makes_no_device_to_host_copy_in_its_steady_state(compiled):
    model, kwargs = MODELS["wan"]()
    model = model.cuda()
    kwargs = {k: v.cuda() for k, v in kwargs.items()}
    texts = [kwargs["encoder_hidden_states"], torch.randn_like(kwargs["encoder_hidden_states"])]
    timesteps = [torch.full((1,), v, device="cuda") for v in (999.0, 700.0, 400.0, 100.0)]
    plan = ditopt.presets.fora(interval=2, steps=STEPS, level="block")
    if compiled:
        fast = torch.compile(model, backend="ditopt", options={"plan": plan}, fullgraph=True, dynamic=False)
    else:
        fast = ditopt.optimize(model, plan)
    first = _generation(fast, kwargs, timesteps, texts, lambda *a: None)  # capture, compile, inferred steps
    callback = ditopt.step_callback(fast, steps=STEPS)
    ditopt.api.runtime_of(fast).state.tell(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        steady = _generation(fast, kwargs, timesteps, texts, callback)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for a, b in zip(first, steady):
        torch.testing.assert_close(a, b)
    assert ditopt.stats(fast).decisions["blocks.1"] == ["compute", "compute", "reuse_residual", "reuse_residual"] * 2
