"""lxt_ext.attention.softcapped_attention on what the fused op also takes: a query row that sees no key gives 0
(as ``attention_lrp`` does), with finite gradients; the other rows are the same as with an additive mask that
leaves the blind row alone. The LXT formulation itself is checked in tests/unit/models/test_model_coverage.py."""
import pytest
import torch

from lxt_ext.attention import attention_lrp, softcapped_attention


@pytest.mark.parametrize('mode', ['attnlrp', 'cp'])
def test_a_row_that_sees_no_key_gives_zero(mode):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    mask[..., 2, :] = False  # query 2 sees no key
    out = softcapped_attention(q, k, v, mask, softcap=1e6, mode=mode)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    # a softcap far above the scores leaves plain attention: the other rows are attention_lrp's
    fused = attention_lrp(q, k, v, mask, mode=mode)
    torch.testing.assert_close(out, fused, rtol=1e-6, atol=1e-9)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=generator, dtype=torch.float64),
                                allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
