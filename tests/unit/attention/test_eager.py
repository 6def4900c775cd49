"""lxt_ext.attention.eager_attention on what the fused op also takes: a query row that sees no key gives 0
(as ``attention_lrp`` does), with finite gradients; the other rows are the same as with an additive mask that
leaves the blind row alone. The LXT formulation itself is checked in tests/unit/models/test_model_coverage.py."""
import pytest
import torch

from lxt_ext.attention import attention_lrp, eager_attention


@pytest.mark.parametrize('mode', ['attnlrp', 'cp'])
def test_a_row_that_sees_no_key_gives_zero(mode):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 2, :] = False  # query 2 sees no key
    out = eager_attention(q, k, v, mask, softcap=1e6, mode=mode)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    # a softcap far above the scores leaves plain attention: the other rows are attention_lrp's
    fused = attention_lrp(q, k, v, mask, mode=mode)
    torch.testing.assert_close(out, fused, rtol=1e-6, atol=1e-9)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=generator, dtype=torch.float64),
                                allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize('mode', ['attnlrp', 'cp'])
def test_sinks_are_an_extra_key_of_value_zero(mode):
    """Attention sinks (one logit per head, normalised over with the scores, dropped from the output) are the fused
    op's attention with one extra key whose value is zero and whose score is the sink (an additive mask column):
    the same output and the same AttnLRP / CP-LRP gradients for the query, keys and values."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    sinks = torch.randn(4, generator=generator, dtype=torch.float64)
    seed = torch.randn(2, 4, 5, 8, generator=generator, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = eager_attention(*leaves, is_causal=True, sinks=sinks, mode=mode)
    grads = torch.autograd.grad(out, leaves, seed, allow_unused=True)

    causal = torch.zeros(5, 5, dtype=torch.float64).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -torch.inf)
    mask = torch.cat([causal.expand(1, 4, 5, 5), sinks.reshape(1, 4, 1, 1).expand(1, 4, 5, 1)], dim=-1)
    extra = [t.clone().requires_grad_() for t in (q, k, v)]
    zero = torch.zeros(2, 4, 1, 8, dtype=torch.float64)
    fused = attention_lrp(extra[0], torch.cat([extra[1], zero], 2), torch.cat([extra[2], zero], 2), mask, mode=mode)
    expected = torch.autograd.grad(fused, extra, seed, allow_unused=True)
    torch.testing.assert_close(out, fused, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
