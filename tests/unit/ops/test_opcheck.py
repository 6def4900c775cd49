"""``torch.library.opcheck`` on every lxt_ext op: schema (no aliasing or mutation), the fake kernels
(lxt_ext/ops/fake.py: shapes, strides, dtypes against the real outputs) and AOTAutograd tracing with
dynamic shapes, over every rule, both conventions, linear/conv/transposed conv layers, both attention
modes, every mask kind, causal and grouped-query attention.

The inputs do not require grad: the ops are the backward halves of rules and are called only inside the
Python autograd Functions (forward, or a ``once_differentiable`` backward, both with grad mode off), which
own their differentiation (see lxt_ext/ops/fake.py); opcheck then skips ``test_autograd_registration``,
except for the element-wise ops, checked with inputs that do require grad.
"""
import pytest
import torch

from lxt_ext import ops

LIB = ops.lib
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available() or not ops.cuda_built(), reason='needs a GPU and the CUDA kernels'))]
TWO_TERM = ('gamma', 'alpha_beta')


def check(op, args, **kwargs):
    """opcheck with every test; raises on the first failing one."""
    result = torch.library.opcheck(op, args, **kwargs)
    assert result and all(v == 'SUCCESS' for v in result.values()), result


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- lrp_backward ---------------------------------------------------------------------------------

LAYERS = {
    # name: (input shape, weight shape, linear, transposed, stride, padding, dilation, output_padding, groups)
    'linear': ((2, 3, 6), (5, 6), True, False, [1], [0], [1], [0], 1),
    'conv': ((2, 4, 6, 6), (6, 2, 3, 3), False, False, [2, 1], [1, 0], [1, 2], [0, 0], 2),
    'conv_transpose': ((2, 4, 4, 4), (4, 3, 3, 3), False, True, [2, 2], [1, 1], [1, 1], [1, 0], 1),
}


def layer_inputs(layer, nonnegative, device):
    x_shape, w_shape, linear, transposed, stride, padding, dilation, output_padding, groups = LAYERS[layer]
    g = gen(1)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64)
    x = x.clamp(min=0) if nonnegative else x
    w = torch.randn(w_shape, generator=g, dtype=torch.float64)
    if linear:
        y = torch.nn.functional.linear(x, w)
    elif transposed:
        y = torch.nn.functional.conv_transpose2d(x, w, None, stride, padding, output_padding, groups, dilation)
    else:
        y = torch.nn.functional.conv2d(x, w, None, stride, padding, dilation, groups)
    channels = y.shape[-1] if linear else y.shape[1]
    bias = torch.randn(channels, generator=g, dtype=torch.float64)
    grad = torch.randn(y.shape, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (x, w, grad, bias)], (linear, transposed, stride, padding, dilation,
                                                          output_padding, groups)


# A non-negative input takes the two-term rules' stacked path; the one-term rules have no other.
LRP_CASES = [(rule, explicit, layer, nonnegative) for rule in ops.RULES for explicit in (True, False)
             for layer in LAYERS for nonnegative in ((False, True) if rule in TWO_TERM else (False,))]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('rule,explicit,layer,nonnegative', LRP_CASES, ids=[
    f'{r}-{"explicit" if e else "gradient_x_input"}-{layer}{"-post_relu" * n}' for r, e, layer, n in LRP_CASES])
def test_lrp_backward(rule, explicit, layer, nonnegative, device):
    (x, w, grad, bias), geometry = layer_inputs(layer, nonnegative, device)
    b1, b2 = bias.clamp(min=0), bias.clamp(max=0)
    check(LIB.lrp_backward.default, (x, w, grad, bias, b1, b2, ops.RULES[rule], 1e-6, 0.25, 2., 1., explicit,
                                     *geometry))


def test_lrp_backward_channels_last_conv():
    """The Gradient x Input epsilon and gradient rules return ATen's transposed product as it is: its
    memory format follows a channels-last input, and the fake kernel must say so."""
    (x, w, grad, bias), geometry = layer_inputs('conv', False, 'cpu')
    x = x.to(memory_format=torch.channels_last)
    for rule in ('gradient', 'epsilon'):
        check(LIB.lrp_backward.default, (x, w, grad, bias, bias, bias, ops.RULES[rule], 1e-6, 0., 0., 0., False,
                                         *geometry))


# --- output_terms and input_terms -----------------------------------------------------------------

def output_terms_args(rule, explicit, channel_dim, stacked, device, requires_grad=False):
    shape, groups = ((3, 4, 6), 1) if channel_dim == -1 else ((2, 6, 3, 2), 3)
    g = gen(2)
    grad = torch.randn(shape, generator=g)
    wide = list(shape)
    wide[channel_dim] *= 2
    wx = torch.randn(wide if stacked else shape, generator=g)
    ax = None if stacked or rule == 'epsilon' else torch.randn(shape, generator=g).abs()
    channels = shape[channel_dim]
    bias, b1, b2 = (torch.randn(channels, generator=g) for _ in range(3))
    tensors = [t if t is None else t.to(device).requires_grad_(requires_grad) for t in (wx, ax, grad)]
    return (*tensors, bias.to(device), b1.to(device), b2.to(device), channel_dim, groups, ops.RULES[rule], 1e-6,
            0.25, 2., 1., explicit)


OUTPUT_CASES = [('epsilon', False)] + [(rule, stacked) for rule in TWO_TERM for stacked in (False, True)]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('channel_dim', [-1, 1], ids=['linear', 'conv'])
@pytest.mark.parametrize('explicit', [True, False], ids=['explicit', 'gradient_x_input'])
@pytest.mark.parametrize('rule,stacked', OUTPUT_CASES, ids=[f'{r}{"_stacked" * s}' for r, s in OUTPUT_CASES])
def test_output_terms(rule, stacked, explicit, channel_dim, device):
    args = output_terms_args(rule, explicit, channel_dim, stacked, device)
    expected = 2 if args[1] is not None else 1
    assert len(LIB.output_terms(*args)) == expected
    check(LIB.output_terms.default, args)
    # the element-wise kernels allocate their outputs outside autograd: registration is right as it is
    check(LIB.output_terms.default, output_terms_args(rule, explicit, channel_dim, stacked, device, True),
          test_utils='test_autograd_registration')


INPUT_CASES = {'one_term': (None, False), 'pair': ('pair', False), 'mixed': ('pair', True)}


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('explicit', [True, False], ids=['explicit', 'gradient_x_input'])
@pytest.mark.parametrize('case', list(INPUT_CASES))
def test_input_terms(case, explicit, device):
    second, mixed = INPUT_CASES[case]
    g = gen(3)
    # non-contiguous inputs: the output is contiguous all the same
    x, t, a = (torch.randn(2, 5, 3, generator=g).to(device).transpose(1, 2) for _ in range(3))
    check(LIB.input_terms.default, (x, t, a if second else None, explicit, mixed))
    x, t, a = (u.detach().requires_grad_() for u in (x, t, a))
    check(LIB.input_terms.default, (x, t, a if second else None, explicit, mixed),
          test_utils='test_autograd_registration')


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_identity_backward(dtype, device):
    g = gen(5)
    # non-contiguous inputs: the output is contiguous all the same
    h, x, grad = (torch.randn(2, 5, 3, generator=g).to(device, dtype).transpose(1, 2) for _ in range(3))
    check(LIB.identity_backward.default, (h, x, grad, 1e-10))
    h, x, grad = (u.detach().requires_grad_() for u in (h, x, grad))
    check(LIB.identity_backward.default, (h, x, grad, 1e-10), test_utils='test_autograd_registration')


# --- attention ------------------------------------------------------------------------------------

B, HQ, NQ, NK, D = 2, 4, 5, 6, 8
MASKS = {
    'none': lambda g: None,
    'bool': lambda g: torch.rand(B, HQ, NQ, NK, generator=g) > 0.3,
    'additive': lambda g: torch.randn(B, HQ, NQ, NK, generator=g),
    'additive_inf': lambda g: torch.zeros(B, 1, 1, NK).masked_fill(torch.rand(B, 1, 1, NK, generator=g) > 0.6,
                                                                   float('-inf')),
    'bool_broadcast': lambda g: torch.rand(NQ, NK, generator=g) > 0.3,
    'additive_broadcast_float64': lambda g: torch.randn(1, HQ, 1, NK, generator=g, dtype=torch.float64),
}


def attention_inputs(heads_kv, dtype, mask, device):
    g = gen(4)
    q = torch.randn(B, HQ, NQ, D, generator=g)
    k, v = (torch.randn(B, heads_kv, NK, D, generator=g) for _ in range(2))
    m = MASKS[mask](g)
    return [t.to(device, dtype) for t in (q, k, v)] + [None if m is None else m.to(device)]


# Every mask kind; causal (alone and with a mask) and grouped-query attention; the other dtypes.
ATTENTION_CASES = ([(mask, False, HQ, torch.float32) for mask in MASKS]
                   + [(mask, True, 2, torch.float32) for mask in ('none', 'bool', 'additive_broadcast_float64')]
                   + [('bool', True, 2, dtype) for dtype in (torch.float64, torch.bfloat16)])


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('mask,causal,heads_kv,dtype', ATTENTION_CASES, ids=[
    f'{mask}{"-causal" * c}{"-gqa" * (h != HQ)}-{str(dt)[6:]}' for mask, c, h, dt in ATTENTION_CASES])
@pytest.mark.parametrize('mode', list(ops.ATTENTION_MODES))
def test_attention(mode, mask, causal, heads_kv, dtype, device):
    q, k, v, m = attention_inputs(heads_kv, dtype, mask, device)
    scale = D ** -0.5
    check(LIB.attention_forward.default, (q, k, v, m, scale, causal))
    out, stats = LIB.attention_forward(q, k, v, m, scale, causal)
    assert stats.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    grad_out = torch.randn(out.shape, generator=gen(5)).to(device, dtype)
    code = ops.ATTENTION_MODES[mode]
    if mode == 'cp':  # what _AttentionLRP keeps for CP-LRP: a stride-0 stand-in of O
        out = out.new_zeros(()).expand(out.shape)
    grads = LIB.attention_backward(grad_out, q, k, v, m, out, stats, scale, causal, code)
    assert [tuple(t.shape) for t in grads] == [tuple(t.shape) for t in ((v,) if mode == 'cp' else (q, k, v))]
    check(LIB.attention_backward.default, (grad_out, q, k, v, m, out, stats, scale, causal, code))


def test_fake_kernels_reject_what_the_ops_reject():
    """The output count of attention_backward and output_terms depends on a code: a wrong one raises
    under FakeTensor tracing too, not only at run time."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v, _ = attention_inputs(HQ, torch.float32, 'none', 'cpu')
    out, stats = LIB.attention_forward(q, k, v, None, 0.3, False)
    args = output_terms_args('epsilon', True, -1, False, 'cpu')
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(RuntimeError, match='mode'):
            LIB.attention_backward(out, q, k, v, None, out, stats, 0.3, False, 7)
        with pytest.raises(RuntimeError, match='gradient rule'):
            LIB.output_terms(*args[:8], ops.RULES['gradient'], *args[9:])
