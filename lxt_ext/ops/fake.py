"""Fake (meta) kernels of every lxt_ext op (``torch.library.register_fake``): output shapes, dtypes and
devices without computing anything, so that ``torch.compile`` (FakeTensor tracing) and
``torch.library.opcheck`` see through the ops. Each mirrors the allocation of the C++ op (csrc/), strides
included: opcheck compares them with the real outputs.

Autograd: no op gets ``torch.library.register_autograd``; the op pairs stay behind the Python autograd
Functions (``lxt_ext.attention._AttentionLRP``, ``lxt_ext.core._FusedLayer``), which dynamo traces, forward
and ``once_differentiable`` backward, into the captured graph (tests/unit/ops/test_compile.py). The ops are the
*backward* halves of LRP rules: ``lrp_backward``'s forward is an ATen Linear/convolution, not an lxt_ext op,
and ``attention_forward`` takes no ``mode`` (AttnLRP and CP-LRP share it; only ``attention_backward`` is
told which), so neither forward could carry the rule's backward without a schema change. Nor are the ops
differentiable themselves (an LRP backward has no meaningful derivative). The Functions call them with grad
mode off, so opcheck (tests/unit/ops/test_opcheck.py) runs them on inputs that do not require grad and skips
``test_autograd_registration``; the element-wise ``output_terms``/``input_terms`` pass it on inputs that
do. ``lrp_backward`` and the attention ops (CompositeExplicitAutograd kernels calling ATen ops) would need
a non-differentiable Autograd kernel in csrc/ to pass it on such inputs.
"""
import torch


def _codes():
    """``(RULES, ATTENTION_MODES)`` of ``lxt_ext.ops``; read at call time, as this module is imported first."""
    from . import ATTENTION_MODES, RULES
    return RULES, ATTENTION_MODES


def _check_one_device(op, **tensors):
    """The C++ ops' device check. Needed here too: a mix of real and meta tensors dispatches to the Meta
    key, so this kernel, not the op, is what such a call runs."""
    devices = {t.device for t in tensors.values()}
    torch._check(len(devices) == 1, lambda: f'lxt_ext::{op}: ' + ', '.join(
        f'{name} ({t.device})' for name, t in tensors.items()) + ' must be on one device')


def _acc_dtype(dtype):
    """The accumulation dtype of the C++ kernels: float64 stays, every other float becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake('lxt_ext::output_terms')
def _output_terms(wx, ax, grad, bias, bias1, bias2, channel_dim, groups, rule, epsilon, gamma, alpha, beta,
                  explicit_relevance):
    """``[s]`` of ``wx``'s shape (epsilon; or a two-term rule given the stacked pair as ``wx``), or
    ``[s, d]`` when ``ax`` is given; contiguous, in ``wx``'s dtype."""
    _check_one_device('output_terms', relevance=grad, layer_output=wx)
    torch._check(rule != _codes()[0]['gradient'], lambda: 'lxt_ext::output_terms: the gradient rule has no terms')
    # The C++ op allocates d whenever ax is given (even for epsilon, which leaves it unwritten).
    return [wx.new_empty(wx.shape) for _ in range(1 if ax is None else 2)]


@torch.library.register_fake('lxt_ext::input_terms')
def _input_terms(x, t, a, explicit_relevance, mixed):
    """The input's shape and dtype, contiguous."""
    _check_one_device('input_terms', input=x, product=t)
    return x.new_empty(x.shape)


@torch.library.register_fake('lxt_ext::identity_backward')
def _identity_backward(output, input, grad, stabilizer):
    """The input's shape and dtype, contiguous."""
    _check_one_device('identity_backward', output=output, input=input, grad=grad)
    return input.new_empty(input.shape)


@torch.library.register_fake('lxt_ext::lrp_backward')
def _lrp_backward(x, weight, grad, bias, bias1, bias2, rule, epsilon, gamma, alpha, beta, explicit_relevance,
                  linear, transposed, stride, padding, dilation, output_padding, groups):
    """The input's shape and dtype. Rules that end in ``input_terms`` return it contiguous; the gradient
    rule and epsilon in the Gradient x Input convention return the transposed product itself, whose
    strides (a convolution's memory format) ATen's own fake kernel gives."""
    _check_one_device('lrp_backward', input=x, weight=weight, relevance=grad)
    rules = _codes()[0]
    if rule != rules['gradient'] and (rule != rules['epsilon'] or explicit_relevance):
        return x.new_empty(x.shape)
    # epsilon's product runs on output_terms' result (contiguous), the gradient rule's on grad itself
    s = grad if rule == rules['gradient'] else grad.new_empty(grad.shape)
    if linear:
        return torch.matmul(s, weight)
    return torch.ops.aten.convolution_backward(s, x, weight, None, stride, padding, dilation, transposed,
                                               output_padding, groups, [True, False, False])[0]


@torch.library.register_fake('lxt_ext::attention_forward')
def _attention_forward(query, key, value, attn_mask, scale, is_causal):
    """``(O, stats)``: O ``(B, Hq, Nq, D)`` in the query's dtype, stats ``(B, Hq, Nq, 2)`` (row max, log
    row sum) in the accumulation dtype (float32 for half types); both contiguous."""
    _check_one_device('attention_forward', query=query, key=key, value=value)
    B, Hq, Nq, D = query.shape
    return query.new_empty((B, Hq, Nq, D)), query.new_empty((B, Hq, Nq, 2), dtype=_acc_dtype(query.dtype))


@torch.library.register_fake('lxt_ext::attention_backward')
def _attention_backward(grad_out, query, key, value, attn_mask, out, stats, scale, is_causal, mode):
    """``[dQ, dK, dV]`` (mode 0, AttnLRP) or ``[dV]`` (mode 1, CP-LRP), of the query's, key's and value's
    shapes, in the query's dtype, contiguous."""
    _check_one_device('attention_backward', query=query, key=key, value=value, grad_out=grad_out, out=out,
                      stats=stats)
    modes = _codes()[1]
    torch._check(mode in modes.values(), lambda: f'lxt_ext::attention_backward: mode must be in {modes}, got {mode}')
    dv = query.new_empty(value.shape)
    if mode == modes['cp']:
        return [dv]
    return [query.new_empty(query.shape), query.new_empty(key.shape), dv]
