"""Rules of lxt_ext's transformer composites, in the Gradient x Input convention.

There the gradient ``g_t`` of a tensor ``t`` carries relevance per unit of ``t``: ``R_t = t * g_t``.
Linear operations (residual adds, concatenation, reshapes, position embeddings) then propagate
relevance exactly under plain autograd; the rules here change the backward of the rest:

- element-wise activations ``h = f(x)``: identity rule, ``g_in = g_out * f(x) / stab(x)``;
- LayerNorm / RMSNorm: identity on the normalisation, the backward with ``rstd`` held constant;
- element-wise products ``p = a * b``: uniform rule, ``g_a = g_out * b / 2``, ``g_b = g_out * a / 2``;
- Linear layers: epsilon from the output (``OutputEpsilon``) where the input is not needed;
- Linear layers called functionally (``torch.nn.MultiheadAttention``'s projections): the
  composite's Linear rule, applied by ``linear_rule_apply``;
- attention: AttnLRP or CP-LRP through ``lxt_ext.attention.attention_lrp``;
- zennit's own rules (``BasicHook`` subclasses: Epsilon, Gamma, Flat, ZBox, WSquare, ...): zennit's
  backward on ``R_out = y * g_out``, then ``g_in = R_in / stab(x)`` (or ``R_in`` itself on the first
  layer, so that zennit's attributors return relevance).

``stab(z) = z + eps * (sign(z) + [z == 0])`` is zennit's stabilizer. Each rule saves only what its
backward needs (the identity rule its input, the norms their per-row ``rstd``).
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from zennit.core import BasicHook, Hook
from zennit.rules import Pass as ZennitPass

from .attention import attention_lrp
from .layers import LayerSpec, UnsupportedLayerError
from .rules import FusedRule, Norm, Pass, ProductRule, SwappedForward, _FusedLayer

__all__ = [
    'ActivationIdentity', 'NormIdentity', 'DropoutOff', 'OutputEpsilon', 'ZennitRule', 'ExplicitRelevance',
    'ExplicitConvention', 'MultiheadAttentionRule',
    'identity_rule', 'layer_norm_identity', 'rms_norm_identity', 'uniform_product', 'linear_rule_apply',
    'gradient_x_input',
]

_LINEAR = LayerSpec(linear=True)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def stabilize(x, epsilon):
    """zennit's ``stabilize``: ``x + eps`` where ``x >= 0``, ``x - eps`` elsewhere."""
    return torch.where(x >= 0, x + epsilon, x - epsilon)


# --- element-wise activations -----------------------------------------------------------------

class _IdentityRule(torch.autograd.Function):
    """``h = f(x)``; backward ``g_in = g_out * f(x) / stab(x)`` with ``f(x)`` recomputed, so only
    ``x`` is saved (LXT saves the ratio: the same memory, plus a division in every forward)."""

    @staticmethod
    def forward(ctx, x, fn, epsilon):
        output = fn(x)
        if not isinstance(output, torch.Tensor) or output.shape != x.shape:
            raise TypeError(f'the identity rule needs an element-wise function (output of the input\'s shape); '
                            f'{fn} is not')
        ctx.save_for_backward(x)
        ctx.fn, ctx.epsilon = fn, epsilon
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        ratio = ctx.fn(x)
        ratio /= stabilize(x, ctx.epsilon)
        return ratio.mul_(grad), None, None


def identity_rule(fn, x, epsilon=1e-10):
    """``fn(x)`` for an element-wise ``fn``, with the identity rule in backward.

    The output is tagged with ``(x, fn, version)``: a fused rule consuming it unchanged (the next
    Linear of an MLP) keeps ``x``, which this rule keeps anyway, and recomputes ``fn(x)`` in backward
    instead of keeping a second activation-sized tensor (see ``lxt_ext.rules._FusedLayer``)."""
    output = _IdentityRule.apply(x, fn, epsilon)
    output._lxt_ext_recompute = (x, fn, output._version)
    return output


class ActivationIdentity(SwappedForward):
    """The identity rule on an element-wise activation module (``nn.GELU``, ``nn.SiLU``, ``nn.ReLU``,
    ``nn.Tanh``, ``nn.Sigmoid``, timm's and transformers' activation modules): the relevance of
    each output goes to the input it was computed from."""

    def __init__(self, epsilon=1e-10):
        super().__init__()
        self.epsilon = epsilon

    def apply(self, module, original, input, args, kwargs):
        if getattr(module, 'inplace', False):
            # an in-place activation would overwrite the input the backward needs
            def fn(x):
                return original(x.clone(), *args, **kwargs)
        else:
            def fn(x):
                return original(x, *args, **kwargs)
        return identity_rule(fn, input, self.epsilon)


# --- normalisation ------------------------------------------------------------------------------

def _float_rstd(x, dims, eps, centred):
    xf = x.float()
    var = xf.var(dims, unbiased=False, keepdim=True) if centred else xf.pow(2).mean(dims, keepdim=True)
    return torch.rsqrt(var + eps)


class _LayerNormIdentity(torch.autograd.Function):
    """``y = (x - mean(x)) * rstd * w + b``; backward with ``rstd`` constant:
    ``g_in = rstd * (g w - mean(g w))``. Saves ``rstd`` (one number per row) and the weight."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps):
        output, _, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        dims = tuple(range(-len(normalized_shape), 0))
        if x.dtype in _LOW_PRECISION:
            # native_layer_norm returns rstd in the input dtype on the CPU
            rstd = _float_rstd(x, dims, eps, centred=True)
        ctx.save_for_backward(rstd, weight)
        ctx.dims = dims
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rstd, weight = ctx.saved_tensors
        gw = grad.float() if weight is None else grad.float() * weight.float()
        grad_input = (gw - gw.mean(ctx.dims, keepdim=True)).mul_(rstd)
        return grad_input.to(grad.dtype), None, None, None, None


def layer_norm_identity(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)`` with the identity rule on the
    normalisation (the backward treats ``rstd`` as a constant). Parameters get no gradient."""
    return _LayerNormIdentity.apply(x, tuple(normalized_shape), weight, bias, eps)


class _RMSNormIdentity(torch.autograd.Function):
    """``y = w * x * rstd``, ``rstd = rsqrt(mean(x^2) + eps)`` in float32; backward with ``rstd``
    constant: ``g_in = g * w * rstd``. Saves ``rstd`` and the weight."""

    @staticmethod
    def forward(ctx, x, weight, eps, weight_offset, ndim):
        dims = tuple(range(-ndim, 0))
        rstd = _float_rstd(x, dims, eps, centred=False)
        if weight is None:
            output = (x.float() * rstd).to(x.dtype)
        elif weight_offset == 0:
            # LlamaRMSNorm: normalise in float32, back to the input dtype, then scale
            output = weight * (x.float() * rstd).to(x.dtype)
        else:
            # GemmaRMSNorm: scale by (offset + w) in float32, then back to the input dtype
            output = (x.float() * rstd * (weight_offset + weight.float())).to(x.dtype)
        ctx.save_for_backward(rstd, weight)
        ctx.weight_offset = weight_offset
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rstd, weight = ctx.saved_tensors
        grad_input = grad.float() * rstd
        if weight is not None:
            grad_input *= weight.float() + ctx.weight_offset
        return grad_input.to(grad.dtype), None, None, None, None


def rms_norm_identity(x, weight, eps, weight_offset=0.0, *, normalized_ndim=1):
    """An RMSNorm over the last ``normalized_ndim`` dimensions with the identity rule on the
    normalisation. As transformers' ``LlamaRMSNorm`` (``weight_offset=0``: float32 statistics,
    ``w * normalised.to(dtype)``) or ``GemmaRMSNorm`` (``weight_offset=1``: ``(1 + w)`` applied in
    float32); returns the input dtype (promoted with the weight's in the Llama form)."""
    return _RMSNormIdentity.apply(x, weight, eps, float(weight_offset), normalized_ndim)


class NormIdentity(SwappedForward):
    """The identity rule on ``nn.LayerNorm`` and ``nn.RMSNorm`` (normalising the last dimensions).

    ``kind`` (``'layer_norm'`` or ``'rms_norm'``) vouches that a subclass with a forward of its own
    still normalises the last ``normalized_shape`` dimensions (timm's LayerNorm and RmsNorm);
    without it, only modules running torch's own forward are accepted (timm's LayerNorm2d, which
    normalises channels, would be silently wrong)."""

    _KINDS = {torch.nn.LayerNorm: 'layer_norm', torch.nn.RMSNorm: 'rms_norm'}

    def __init__(self, kind=None):
        super().__init__()
        if kind not in (None, 'layer_norm', 'rms_norm'):
            raise ValueError(f"kind must be None, 'layer_norm' or 'rms_norm', got {kind!r}")
        self.kind = kind

    def prepare(self, module):
        if self.kind is not None:
            return
        for base, kind in self._KINDS.items():
            if isinstance(module, base) and type(module).forward is base.forward:
                return
        raise UnsupportedLayerError(
            f'NormIdentity takes nn.LayerNorm and nn.RMSNorm with torch\'s own forward, not {type(module).__name__}; '
            f'pass kind=\'layer_norm\' or \'rms_norm\' if it normalises the last dimensions the same way')

    def apply(self, module, original, input, args, kwargs):
        kind = self.kind or next(k for base, k in self._KINDS.items() if isinstance(module, base))
        shape = tuple(module.normalized_shape)
        if kind == 'layer_norm':
            return layer_norm_identity(input, shape, module.weight, module.bias, module.eps)
        eps = module.eps if module.eps is not None else torch.finfo(input.dtype).eps
        return rms_norm_identity(input, module.weight, eps, normalized_ndim=len(shape))


# --- products and dropout -----------------------------------------------------------------------

class _UniformProduct(torch.autograd.Function):
    """``p = a * b``; backward ``g_a = g b / 2``, ``g_b = g a / 2`` (half the relevance to each)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = (grad * b / 2).sum_to_size(a.shape) if ctx.needs_input_grad[0] else None
        grad_b = (grad * a / 2).sum_to_size(b.shape) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def uniform_product(a, b):
    """``a * b`` (broadcasting) with the uniform rule in backward."""
    return _UniformProduct.apply(a, b)


class DropoutOff(SwappedForward):
    """Dropout modules return their input while registered (also in ``train()`` mode, which
    gradient checkpointing in transformers requires)."""

    def register(self, module):
        handles = super().register(module)
        swapped, hook = module.forward, self

        def forward(input, *args, **kwargs):
            return input if hook.active else swapped.__wrapped__(input, *args, **kwargs)

        forward.__wrapped__ = swapped.__wrapped__
        module.forward = forward
        return handles

    def apply(self, module, original, input, args, kwargs):
        return input


# --- zennit's rules and the first layer ---------------------------------------------------------

class _ZennitBackward(torch.autograd.Function):
    """The module's forward; in backward, zennit's rule on ``R_out = y * g_out``."""

    @staticmethod
    def forward(ctx, input, rule, module, original, args, kwargs):
        output = original(input, *args, **kwargs)
        ctx.save_for_backward(input, output)
        ctx.rule, ctx.module, ctx.original, ctx.args, ctx.kwargs = rule, module, original, args, kwargs
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, output = ctx.saved_tensors
        # linear_rule_apply passes a factory: the module is built only when a backward needs it
        module = ctx.module if isinstance(ctx.module, torch.nn.Module) else ctx.module()
        grad_input = ctx.rule.grad_input(module, ctx.original, x, output, grad, ctx.args, ctx.kwargs)
        return grad_input, None, None, None, None, None


class ZennitRule(SwappedForward):
    """A zennit rule (a ``BasicHook``: Epsilon, Gamma, ZPlus, AlphaBeta, Flat, WSquare, ZBox, ...)
    in the Gradient x Input convention, for this hook only (zennit is not patched): zennit's own
    backward runs on ``R_out = y * g_out`` and gives ``R_in``; the gradient is ``R_in / stab(x)``,
    or ``R_in`` itself with ``explicit_output`` (the first layer, so attributors return relevance)."""

    def __init__(self, rule, explicit_output=False, epsilon=1e-10):
        super().__init__()
        if not isinstance(rule, BasicHook):
            raise TypeError(f'ZennitRule adapts zennit BasicHook rules, not {type(rule).__name__}')
        self.rule = rule
        self.explicit_output = explicit_output
        self.epsilon = epsilon

    def copy(self):
        copy = super().copy()
        copy.rule = self.rule.copy()
        return copy

    def apply(self, module, original, input, args, kwargs):
        return _ZennitBackward.apply(input, self, module, original, args, kwargs)

    def grad_input(self, module, original, x, output, grad, args, kwargs):
        if not self.active:
            with torch.enable_grad():
                leaf = x.detach().requires_grad_()
                return torch.autograd.grad(original(leaf, *args, **kwargs), leaf, grad)[0]
        rule = self.rule
        rule.stored_tensors['input'] = (x, *args)  # what zennit's forward hook would have kept
        rule.stored_tensors['kwargs'] = kwargs     # (zennit 1.0 also keeps the keyword arguments)
        # zennit re-runs module.forward, which is swapped to this rule while registered: make it plain
        self.active = False
        try:
            (relevance, *_) = rule.backward(module, (x,), (grad * output,))
        finally:
            self.active = True
            rule.stored_tensors.clear()
        return relevance if self.explicit_output else relevance / stabilize(x, self.epsilon)


class _TimesInput(torch.autograd.Function):
    """Identity forward; backward ``g * x``: turns the gradient into explicit relevance."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x


class _ConventionWrapper(SwappedForward):
    """A rule that runs another lxt_ext rule (``self.rule``) in a changed convention."""

    def copy(self):
        copy = super().copy()
        copy.rule = self.rule.copy()
        return copy

    def prepare(self, module):
        self.rule.prepare(module)


class ExplicitRelevance(_ConventionWrapper):
    """An lxt_ext rule (fused, or another ``SwappedForward`` Linear rule) on the first layer whose
    backward emits ``R_in = x * g_in``, so that ``zennit.attribution.Gradient`` returns relevance.
    (zennit rules: ``ZennitRule(rule, explicit_output=True)``.)"""

    def __init__(self, rule):
        super().__init__()
        self.rule = gradient_x_input(rule)

    def apply(self, module, original, input, args, kwargs):
        return self.rule.apply(module, original, _TimesInput.apply(input), args, kwargs)


class _OverStabilizedInput(torch.autograd.Function):
    """Identity forward; backward ``g / stab(x)``: turns explicit relevance into a gradient."""

    @staticmethod
    def forward(ctx, x, epsilon):
        ctx.save_for_backward(x)
        ctx.epsilon = epsilon
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / stabilize(x, ctx.epsilon), None


class ExplicitConvention(_ConventionWrapper):
    """An lxt_ext rule of zennit's explicit convention only (``ZBox``, ``Flat``, ``Norm``) in a
    Gradient x Input composite: it gets ``R_out = y * g_out`` and its ``R_in`` leaves as
    ``R_in / stab(x)``, or as ``R_in`` itself with ``explicit_output`` (the first layer)."""

    def __init__(self, rule, explicit_output=False, epsilon=1e-10):
        super().__init__()
        self.rule, self.explicit_output, self.epsilon = rule, explicit_output, epsilon

    def apply(self, module, original, input, args, kwargs):
        x = input if self.explicit_output else _OverStabilizedInput.apply(input, self.epsilon)
        return _TimesInput.apply(self.rule.apply(module, original, x, args, kwargs))


def gradient_x_input(rule, epsilon=1e-10):
    """``rule`` (a template) as it runs in a Gradient x Input composite: lxt_ext's fused rules get
    ``convention='gradient_x_input'``, zennit's BasicHook rules are wrapped in ``ZennitRule``,
    zennit's and lxt_ext's Pass become the identity rule (the same rule: ``R_in = R_out``), lxt_ext's
    explicit-only rules (ZBox, Flat, Norm) are wrapped in ``ExplicitConvention``;
    rules written for this convention (lxt_ext's SwappedForward rules, ``adapters.KeepGradient``)
    are returned as they are. Other zennit hooks have no Gradient x Input form: TypeError."""
    if isinstance(rule, FusedRule):
        if rule.convention == 'gradient_x_input':
            return rule
        copy = rule.copy()
        copy.convention = 'gradient_x_input'
        return copy
    if isinstance(rule, (Pass, ZennitPass)):
        return ActivationIdentity(epsilon)
    if isinstance(rule, (ProductRule, Norm)):
        return ExplicitConvention(rule, epsilon=epsilon)
    if isinstance(rule, SwappedForward) or not isinstance(rule, Hook) or type(rule).register is not Hook.register:
        return rule
    if isinstance(rule, BasicHook):
        return ZennitRule(rule, epsilon=epsilon)
    raise TypeError(f'{type(rule).__name__} is a zennit hook with no Gradient x Input form; lxt_ext\'s transformer '
                    f'composites take zennit BasicHook rules (Epsilon, Gamma, Flat, ZBox, ...), Pass, and lxt_ext '
                    f'rules')


# --- epsilon from the output ------------------------------------------------------------------

class _EpsilonFromOutput(torch.autograd.Function):
    """``y = x W^T + b``; backward ``g_in = W^T (g y / stab(y)) = (g |y| / (|y| + eps)) W``.
    Keeps only ``y`` (and W): no product is recomputed, and the next rule often keeps ``y`` anyway."""

    @staticmethod
    def forward(ctx, x, weight, epsilon, original):
        output = original(x)
        ctx.save_for_backward(output, weight)
        ctx.epsilon = epsilon
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        output, weight = ctx.saved_tensors
        magnitude = output.float().abs() if output.dtype in _LOW_PRECISION else output.abs()
        ratio = magnitude.div_(magnitude + ctx.epsilon).mul_(grad)
        return ratio.to(weight.dtype) @ weight, None, None, None


class OutputEpsilon(SwappedForward):
    """LRP-epsilon on ``nn.Linear`` in the Gradient x Input convention, computed from the layer's
    output: ``g_in = W^T (g_out * y / stab(y))`` needs ``y`` only, not the input. Same relevance as
    ``lxt_ext.rules.Epsilon(epsilon, convention='gradient_x_input')``, which keeps the input and
    recomputes ``y`` in backward; this keeps ``y``, which in a ViT the next rule keeps anyway
    (GELU's input, the attention's q, k, v), and is smaller than the input of the MLP's second layer.
    An in-place change of ``y`` after the layer makes the backward raise (autograd's version check)."""

    def __init__(self, epsilon=1e-6):
        super().__init__()
        self.epsilon = float(epsilon)

    def prepare(self, module):
        if not isinstance(module, torch.nn.Linear):
            raise UnsupportedLayerError(f'OutputEpsilon takes nn.Linear modules, not {type(module).__name__}')

    def apply(self, module, original, input, args, kwargs):
        return _EpsilonFromOutput.apply(input, module.weight, self.epsilon, lambda x: original(x, *args, **kwargs))


# --- Linear layers called functionally --------------------------------------------------------

class _LinearShell(torch.nn.Linear):
    """A Linear module over given weight and bias (no copies), for zennit rules, which modify and
    re-run a module's parameters and forward."""

    def __init__(self, weight, bias):
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)


def linear_rule_apply(rule, x, weight, bias=None):
    """``F.linear(x, weight, bias)`` with ``rule`` (an lxt_ext fused rule or a zennit rule template,
    run in the Gradient x Input convention; None: the plain gradient) in backward: for linear maps
    that are not called as ``nn.Linear`` modules, where zennit's hooks never fire."""
    if rule is None or not (rule.active and torch.is_grad_enabled() and x.requires_grad):
        return F.linear(x, weight, bias)
    rule = gradient_x_input(rule)

    def original(input):
        return F.linear(input, weight, bias)

    if isinstance(rule, FusedRule):
        return _FusedLayer.apply(x, weight, bias, rule, _LINEAR, None, original, (), {})
    if isinstance(rule, OutputEpsilon):
        return _EpsilonFromOutput.apply(x, weight, rule.epsilon, original)
    if isinstance(rule, ZennitRule):
        return _ZennitBackward.apply(x, rule, lambda: _LinearShell(weight, bias), original, (), {})
    raise TypeError(f'linear_rule_apply takes lxt_ext Linear rules and zennit BasicHook rules, not '
                    f'{type(rule).__name__}')


# --- attention ----------------------------------------------------------------------------------

def _mha_arguments(key, value, key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True,
                   is_causal=False):
    return key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal


def _additive(mask, dtype):
    """An nn.MultiheadAttention mask (bool: True = not allowed; float: added) as a float mask."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float('-inf'))


class MultiheadAttentionRule(SwappedForward):
    """``torch.nn.MultiheadAttention`` with its input and output projections (which it calls
    functionally, out of zennit's reach) under ``linear_rule`` (a rule template; None: the plain
    gradient, as in LXT) and the attention under AttnLRP or CP-LRP (``lxt_ext.attention``).

    Supported: batch_first True and False, unbatched input, self-attention and separate
    query/key/value, packed or separate projection weights, ``attn_mask``, ``key_padding_mask``,
    ``is_causal``. With ``need_weights=True`` the returned attention weights are computed apart
    and carry no relevance. Dropout is off. Not supported: ``add_bias_kv``, ``add_zero_attn``."""

    def __init__(self, attention='attnlrp', linear_rule=None):
        super().__init__()
        if attention not in ('attnlrp', 'cp'):
            raise ValueError(f"attention must be 'attnlrp' or 'cp', got {attention!r}")
        self.attention = attention
        self.linear_rule = None if linear_rule is None else gradient_x_input(linear_rule)

    def prepare(self, module):
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f'MultiheadAttentionRule takes nn.MultiheadAttention, not {type(module).__name__}')
        if module.bias_k is not None or module.add_zero_attn:
            raise NotImplementedError(
                'MultiheadAttentionRule does not support add_bias_kv or add_zero_attn; leave this module to another '
                'rule (layer_map) or out of the composite')

    def apply(self, module, original, query, args, kwargs):
        key, value, key_padding_mask, need_weights, attn_mask, average, is_causal = _mha_arguments(*args, **kwargs)
        unbatched = query.dim() == 2
        same_kv, self_attention = key is value, query is key and key is value
        if unbatched:
            query, key, value = query[:, None], key[:, None], value[:, None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        if not module.batch_first or unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self._project(module, query, key, value, self_attention, same_kv)
        batch, heads, length = q.shape[0], module.num_heads, q.shape[2]
        mask = self._mask(attn_mask, key_padding_mask, batch, heads, q.dtype)
        causal = bool(is_causal and mask is None)
        output = attention_lrp(q, k, v, mask, is_causal=causal, mode=self.attention)
        output = output.transpose(1, 2).reshape(batch, length, module.embed_dim)
        output = linear_rule_apply(self.linear_rule, output, module.out_proj.weight, module.out_proj.bias)
        if not module.batch_first or unbatched:
            output = output.transpose(0, 1)
        weights = self._weights(q, k, mask, causal, average) if need_weights else None
        if unbatched:
            output, weights = output[:, 0], None if weights is None else weights[0]
        return output, weights

    def _project(self, module, query, key, value, self_attention, same_kv):
        """``(B, H, N, D)`` query, key and value from ``(B, N, E)`` inputs."""
        E, H = module.embed_dim, module.num_heads
        rule, bias = self.linear_rule, module.in_proj_bias
        biases = (None,) * 3 if bias is None else bias.chunk(3)
        if module._qkv_same_embed_dim and self_attention:
            projected = linear_rule_apply(rule, query, module.in_proj_weight, bias).chunk(3, dim=-1)
        elif module._qkv_same_embed_dim:
            weights = module.in_proj_weight.chunk(3)
            q = linear_rule_apply(rule, query, weights[0], biases[0])
            if same_kv:
                k, v = linear_rule_apply(rule, key, module.in_proj_weight[E:], None if bias is None else bias[E:]
                                         ).chunk(2, dim=-1)
            else:
                k = linear_rule_apply(rule, key, weights[1], biases[1])
                v = linear_rule_apply(rule, value, weights[2], biases[2])
            projected = (q, k, v)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
            projected = tuple(linear_rule_apply(rule, t, w, b) for t, w, b in zip((query, key, value), weights, biases))
        return tuple(t.unflatten(-1, (H, E // H)).transpose(1, 2) for t in projected)

    @staticmethod
    def _mask(attn_mask, key_padding_mask, batch, heads, dtype):
        """One additive mask broadcastable to ``(B, H, L, S)``, or None."""
        attn_mask, key_padding_mask = _additive(attn_mask, dtype), _additive(key_padding_mask, dtype)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.view(batch, heads, *attn_mask.shape[1:])
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[:, None, None, :]
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        return attn_mask

    @staticmethod
    @torch.no_grad()
    def _weights(q, k, mask, causal, average):
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores + mask
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float('-inf'))
        weights = scores.softmax(-1)
        return weights.mean(1) if average else weights
