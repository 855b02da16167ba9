import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny tensors: one thread is faster, and timing-free tests need no more.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entries or counters leak between tests."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield


@pytest.fixture
def one_rank(tmp_path):
    """A gloo group of one rank in this process (collectives run, nothing leaves it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
