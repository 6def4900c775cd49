"""``torch.ops.lxt_ext.lrp_backward`` against a plain-PyTorch reference written from the rules'
textbook definitions (modified layers, autograd through each), on hypothesis-drawn shapes."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import lxt_ext.ops  # registers the ops

OPS = torch.ops.lxt_ext
EPSILON, GAMMA, ALPHA_BETA = 1, 2, 3


def stab(z, eps):
    return z + eps * ((z == 0).to(z) + z.sign())


def reference(layer, x, w, b, r, rule, eps=1e-6, gamma=0.25, alpha=2., beta=1.):
    """Explicit relevance R_in from R_out = r: a sum over modified layers, as the rules define it."""
    def grad_times_input(inp, weight, bias, s):
        inp = inp.clone().requires_grad_()
        g, = torch.autograd.grad(layer(inp, weight, bias), inp, s)
        return inp * g

    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    bp, bn = b.clamp(min=0), b.clamp(max=0)
    if rule == EPSILON:
        return grad_times_input(x, w, b, r / stab(layer(x, w, b), eps))
    if rule == GAMMA:
        y = layer(x, w, b)
        wgp, wgn = w + gamma * wp, w + gamma * wn
        zp = layer(xp, wgp, b + gamma * bp) + layer(xn, wgn, None)
        zn = layer(xp, wgn, b + gamma * bn) + layer(xn, wgp, None)
        sp, sn = r * (y > 0) / stab(zp, eps), r * (y < 0) / stab(zn, eps)
        return (grad_times_input(xp, wgp, None, sp) + grad_times_input(xn, wgn, None, sp)
                + grad_times_input(xp, wgn, None, sn) + grad_times_input(xn, wgp, None, sn))
    zp = layer(xp, wp, bp) + layer(xn, wn, None)
    zn = layer(xp, wn, bn) + layer(xn, wp, None)
    sp, sn = r / stab(zp, eps), r / stab(zn, eps)
    return (alpha * (grad_times_input(xp, wp, None, sp) + grad_times_input(xn, wn, None, sp))
            - beta * (grad_times_input(xp, wn, None, sn) + grad_times_input(xn, wp, None, sn)))


def rule_biases(rule, b, gamma):
    if rule == EPSILON:
        return b, torch.zeros_like(b)
    if rule == GAMMA:
        return b + gamma * b.clamp(min=0), b + gamma * b.clamp(max=0)
    return b.clamp(min=0), b.clamp(max=0)


def fused(kind, x, w, b, r, rule, explicit, conv=None, gamma=0.25):
    b1, b2 = rule_biases(rule, b, gamma)
    conv = conv or {}
    return OPS.lrp_backward(
        x, w, r, b, b1, b2, rule, 1e-6, gamma, 2., 1., explicit, kind == 'linear', False,
        conv.get('stride', [1, 1]), conv.get('padding', [0, 0]), [1, 1], [0, 0], conv.get('groups', 1),
    )


@settings(max_examples=40, deadline=None)
@given(
    rule=st.sampled_from([EPSILON, GAMMA, ALPHA_BETA]),
    kind=st.sampled_from(['linear', 'conv']),
    batch=st.integers(1, 3), cin=st.integers(1, 4), cout=st.integers(1, 5),
    size=st.integers(3, 7), stride=st.integers(1, 2), padding=st.integers(0, 1),
    relu=st.booleans(), zeros=st.booleans(), transposed_view=st.booleans(),
    seed=st.integers(0, 2 ** 16),
)
def test_explicit_relevance_matches_the_textbook_rule(rule, kind, batch, cin, cout, size, stride, padding, relu,
                                                      zeros, transposed_view, seed):
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    if kind == 'linear':
        x = torch.randn(batch, cin * size, generator=gen, dtype=dt)
        w = torch.randn(cout, cin * size, generator=gen, dtype=dt)
        layer, conv = F.linear, None
        if transposed_view:  # a non-contiguous input of the same values
            x = x.t().contiguous().t()
    else:
        x = torch.randn(batch, cin, size, size, generator=gen, dtype=dt)
        w = torch.randn(cout, cin, 3, 3, generator=gen, dtype=dt)
        conv = {'stride': [stride] * 2, 'padding': [padding] * 2}

        def layer(inp, weight, bias):
            return F.conv2d(inp, weight, bias, stride=stride, padding=padding)
        if transposed_view:
            x = x.transpose(2, 3).contiguous().transpose(2, 3)
    if relu:
        x = x.relu()
    if zeros:
        x = x * (torch.rand(x.shape, generator=gen, dtype=dt) > 0.3)
    b = torch.randn(cout, generator=gen, dtype=dt) * 0.3
    r = torch.randn(layer(x, w, b).shape, generator=gen, dtype=dt)

    expected = reference(layer, x, w, b, r, rule)
    got = fused(kind, x, w, b, r, rule, True, conv)
    scale = expected.abs().max().clamp(min=1e-12)
    assert (got - expected).abs().max() / scale < 1e-9

    # Gradient x Input: the op takes g with R = y * g and returns g_in with x * g_in = R_in.
    y = layer(x, w, b)
    g = r / y
    got_gxi = fused(kind, x, w, b, g, rule, False, conv)
    expected_gxi = reference(layer, x, w, b, y * g, rule)
    assert (x * got_gxi - expected_gxi).abs().max() / expected_gxi.abs().max().clamp(min=1e-12) < 1e-8


@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-4), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize('rule', [EPSILON, GAMMA, ALPHA_BETA])
def test_low_precision_close_to_float64(dtype, tol, rule):
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(4, 64, generator=gen, dtype=torch.float64) + 0.1
    w = torch.rand(16, 64, generator=gen, dtype=torch.float64) - 0.3
    b = torch.rand(16, generator=gen, dtype=torch.float64)
    r = torch.rand(4, 16, generator=gen, dtype=torch.float64)
    expected = fused('linear', x, w, b, r, rule, True)
    got = fused('linear', x.to(dtype), w.to(dtype), b, r.to(dtype), rule, True)
    assert got.dtype == dtype
    assert ((got.double() - expected).abs().max() / expected.abs().max()) < tol


def test_shape_mismatch_is_an_error():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    b = torch.zeros(3)
    with pytest.raises(RuntimeError, match='does not match'):
        OPS.lrp_backward(x, w, torch.randn(2, 5), b, b, b, EPSILON, 1e-6, 0.25, 2., 1., True, True, False,
                         [1], [0], [1], [0], 1)


@pytest.mark.parametrize('dtype, tol', [(torch.float64, 1e-15), (torch.float32, 1e-6), (torch.bfloat16, 1e-2),
                                        (torch.float16, 2e-3)])
def test_identity_backward_is_the_identity_rule(dtype, tol):
    """``grad * h / stab(x)``, zennit's stabilizer: exact zeros of x divide by +eps, negative x by x - eps; so
    that x * g_in = h * g; non-contiguous inputs give a contiguous result."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64)
    x[0, 0, :3] = torch.tensor([0.0, 1e-12, -1e-12], dtype=torch.float64)
    h, g = F.silu(x), torch.randn(x.shape, generator=gen, dtype=torch.float64)
    eps = 1e-6
    expected = g * h / stab(x, eps)
    args = [t.to(dtype).transpose(1, 2).contiguous().transpose(1, 2) for t in (h, x, g)]
    assert not args[1].is_contiguous()
    got = OPS.identity_backward(*args, eps)
    assert got.dtype == dtype and got.is_contiguous()
    reference_in_dtype = args[2].double() * args[0].double() / stab(args[1].double(), eps)
    assert ((got.double() - reference_in_dtype).abs() / reference_in_dtype.abs().clamp(min=1e-30)).max() < tol
    if dtype == torch.float64:
        # the rule's point: with a small stabilizer the relevance x * g_in is the output's h * g (away from x = 0)
        away = x.abs() > 1e-6
        conserved = x * OPS.identity_backward(h, x, g, 1e-15)
        torch.testing.assert_close(conserved[away], (h * g)[away], rtol=1e-8, atol=0)
        assert got[0, 0, 0] == g[0, 0, 0] * h[0, 0, 0] / eps
    assert OPS.identity_backward(*(t[:0] for t in args), eps).shape == (0, 7, 5)


def test_identity_backward_names_mismatches():
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match='the incoming gradient .* must match the activation input'):
        OPS.identity_backward(x, x, torch.randn(3, 2), 1e-10)
    with pytest.raises(RuntimeError, match='the activation output .* must match the activation input'):
        OPS.identity_backward(x.double(), x, x, 1e-10)
    with pytest.raises(RuntimeError, match='floating'):
        OPS.identity_backward(x.long(), x.long(), x.long(), 1e-10)


def test_cpu_kernels_split_their_loops_over_the_intra_op_threads():
    # at::parallel_for is an inline OpenMP pragma: an extension built without -fopenmp runs every loop on one thread
    threads = torch.get_num_threads()
    try:
        for wanted in (1, 2, 3):
            torch.set_num_threads(wanted)
            assert lxt_ext.ops.kernel_threads() == wanted, 'the CPU kernels ignore torch.set_num_threads (no OpenMP?)'
    finally:
        torch.set_num_threads(threads)
