"""On a CUDA device (skipped without one): a static plan's steady state makes no device-to-host
copy, eager and compiled, once the step is told (``ditopt.step_callback``), and gives the same
outputs as its first generation. ``torch.cuda.set_sync_debug_mode("error")`` turns any
synchronising copy into an error (``ditopt.bench.gpu.sync_check``; ``tools/gpu_run.sh`` runs it on
a lent GPU without pytest)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a lent GPU)")]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_static_plan_makes_no_device_to_host_copy_in_its_steady_state(compiled):
    from ditopt.bench.gpu import sync_check

    decisions = sync_check(compiled)
    assert decisions["blocks.1"] == ["compute", "compute", "reuse_residual", "reuse_residual"] * 2
