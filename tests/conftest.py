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
