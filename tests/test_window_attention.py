"""Window attention (issue 15, item 1's kernel): equal to its dense masked reference, really
cheaper (FLOPs counted), and full attention where the window covers the sequence."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ditopt.flops import CPU_KERNELS as _CPU_KERNELS
from ditopt.runtime.window_attention import window_attention, window_attention_flops, window_mask


@pytest.mark.parametrize("tokens, window, block", [
    (100, 20, 16), (97, 21, None), (33, 6, 4), (64, 1, None), (1000, 128, None), (513, 64, 17), (256, 255, 32),
])
def test_equals_sdpa_with_its_dense_mask(tokens, window, block):
    torch.manual_seed(tokens)
    q, k, v = (torch.randn(2, 3, tokens, 8) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(tokens, window, block))
    assert torch.allclose(window_attention(q, k, v, window, block=block), dense, atol=1e-5)


def test_a_window_over_the_whole_sequence_is_full_attention():
    q, k, v = (torch.randn(1, 2, 50, 8) for _ in range(3))
    assert torch.equal(window_attention(q, k, v, 50), F.scaled_dot_product_attention(q, k, v))
    assert window_mask(50, 64).all()


@pytest.mark.parametrize("tokens, window, block", [(1000, 128, None), (97, 21, 5), (4096, 512, 64)])
def test_every_query_sees_window_keys_around_it(tokens, window, block):
    mask = window_mask(tokens, window, block)
    assert (mask.sum(1) == window).all()
    b = block or max(16, window // 8)
    reach = (window - b) // 2
    i = torch.arange(tokens)
    for offset in (-reach, reach):  # the neighbourhood is there, inside the sequence
        j = (i + offset).clamp(0, tokens - 1)
        assert mask[i, j].all()


def test_it_costs_tokens_times_window():
    q, k, v = (torch.randn(1, 2, 2048, 16) for _ in range(3))
    counted = {}
    for window in (2048, 256, 128):
        with FlopCounterMode(display=False, custom_mapping=_CPU_KERNELS) as counter:
            window_attention(q, k, v, window)
        counted[window] = counter.get_total_flops()
        assert counted[window] == window_attention_flops(1, 2, 2048, 16, window)
    assert counted[2048] == 8 * counted[256] == 16 * counted[128]


def test_gradients_flow():
    q, k, v = (torch.randn(1, 1, 40, 4, requires_grad=True) for _ in range(3))
    window_attention(q, k, v, 8, block=4).sum().backward()
    dense = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    F.scaled_dot_product_attention(*dense, attn_mask=window_mask(40, 8, 4)).sum().backward()
    for a, b in zip((q, k, v), dense):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


def test_bad_window():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="window must be >= 1"):
        window_attention(q, q, q, 0)
