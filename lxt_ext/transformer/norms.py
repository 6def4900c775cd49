"""Identity rule on the normalisation of LayerNorm and RMSNorm (``lxt_ext.transformer``): the backward
with the std (``rstd``, one number per row) held constant. Saves ``rstd`` and the weight only."""
import torch

from ..checks import first_order
from ..core import LOW_PRECISION, SwappedForward
from ..layers import UnsupportedLayerError

__all__ = ['NormIdentity', 'layer_norm_identity', 'rms_norm_identity', 'functional_rms_norm_identity',
           'group_norm_identity']


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
        if x.dtype in LOW_PRECISION:
            # native_layer_norm returns rstd in the input dtype on the CPU
            rstd = _float_rstd(x, dims, eps, centred=True)
        ctx.save_for_backward(rstd, weight)
        ctx.dims = dims
        return output

    @staticmethod
    @first_order
    def backward(ctx, grad):
        rstd, weight = ctx.saved_tensors
        gw = grad.float() if weight is None else grad.float() * weight.float()
        grad_input = (gw - gw.mean(ctx.dims, keepdim=True)).mul_(rstd)
        return grad_input.to(grad.dtype), None, None, None, None


def layer_norm_identity(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)`` with the identity rule on the
    normalisation (the backward treats ``rstd`` as a constant): ``g_in = rstd * (g w - mean(g w))``.
    Parameters get no gradient.

    Parameters
    ----------
    x : torch.Tensor
        The input.
    normalized_shape : sequence of int
        The normalised trailing dimensions, as ``F.layer_norm``.
    weight, bias : torch.Tensor, optional
        The affine parameters (None: none).
    eps : float, optional
        Added to the variance (default 1e-5).

    Returns
    -------
    torch.Tensor
        The normalised ``x``.
    """
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
    @first_order
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
    float32); returns the input dtype (promoted with the weight's in the Llama form). Backward with ``rstd``
    constant: ``g_in = g * (weight_offset + w) * rstd``.

    Parameters
    ----------
    x : torch.Tensor
        The input.
    weight : torch.Tensor or None
        The scale ``w`` (None: none).
    eps : float
        Added to ``mean(x^2)``.
    weight_offset : float, optional
        0 (default) for ``w``, 1 for Gemma's ``(1 + w)``.
    normalized_ndim : int, optional
        Keyword only: how many trailing dimensions are normalised (default 1).

    Returns
    -------
    torch.Tensor
        The normalised ``x``.
    """
    return _RMSNormIdentity.apply(x, weight, eps, float(weight_offset), normalized_ndim)


class _FunctionalRMSNormIdentity(torch.autograd.Function):
    """``F.rms_norm(x, shape, w, eps)`` itself (its own precision); backward with ``rstd`` constant:
    ``g_in = g * w * rstd``. Saves ``rstd`` and the weight."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        output = torch.nn.functional.rms_norm(x, normalized_shape, weight, eps)
        dims = tuple(range(-len(normalized_shape), 0))
        statistics = x.float() if x.dtype in LOW_PRECISION else x
        ctx.save_for_backward(torch.rsqrt(statistics.pow(2).mean(dims, keepdim=True) + eps), weight)
        return output

    @staticmethod
    @first_order
    def backward(ctx, grad):
        rstd, weight = ctx.saved_tensors
        grad_input = grad * rstd if weight is None else grad * rstd * weight
        return grad_input.to(grad.dtype), None, None, None


def functional_rms_norm_identity(x, normalized_shape, weight=None, eps=None):
    """``torch.nn.functional.rms_norm(x, normalized_shape, weight, eps)`` (computed by it, in its precision) with the
    identity rule on the normalisation: ``g_in = g * w * rstd``.

    Parameters
    ----------
    x : torch.Tensor
        The input.
    normalized_shape : sequence of int
        The normalised trailing dimensions.
    weight : torch.Tensor, optional
        The scale (None: none).
    eps : float, optional
        Added to ``mean(x^2)`` (None: the dtype's machine epsilon, as ``F.rms_norm``).

    Returns
    -------
    torch.Tensor
        The normalised ``x``.
    """
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return _FunctionalRMSNormIdentity.apply(x, tuple(normalized_shape), weight, eps)


class _GroupNormIdentity(torch.autograd.Function):
    """``F.group_norm(x, G, w, b, eps)`` itself; backward with each group's ``rstd`` constant:
    ``g_in = rstd * (g w - mean_group(g w))``. Saves ``rstd`` (one number per sample and group) and the weight."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):
        output = torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)
        groups = x.reshape(x.shape[0], num_groups, -1)
        ctx.save_for_backward(_float_rstd(groups, (-1,), eps, centred=True), weight)
        ctx.num_groups = num_groups
        return output

    @staticmethod
    @first_order
    def backward(ctx, grad):
        rstd, weight = ctx.saved_tensors
        gw = grad.float() if weight is None else grad.float() * weight.float().reshape(1, -1, *(1,) * (grad.dim() - 2))
        groups = gw.reshape(grad.shape[0], ctx.num_groups, -1)
        grad_input = (groups - groups.mean(-1, keepdim=True)).mul_(rstd).reshape(grad.shape)
        return grad_input.to(grad.dtype), None, None, None, None


def group_norm_identity(x, num_groups, weight=None, bias=None, eps=1e-5):
    """``F.group_norm(x, num_groups, weight, bias, eps)`` with the identity rule on the normalisation: the
    backward holds each group's ``rstd`` constant (the mean's subtraction is linear and keeps its gradient), so
    ``g_in = rstd * (g w - mean_group(g w))``. Parameters get no gradient.

    Parameters
    ----------
    x : torch.Tensor
        The input, (N, C, ...).
    num_groups : int
        The number of channel groups (C divisible by it).
    weight, bias : torch.Tensor, optional
        The per-channel affine parameters (None: none).
    eps : float, optional
        Added to the variance (default 1e-5).

    Returns
    -------
    torch.Tensor
        The normalised ``x``.
    """
    return _GroupNormIdentity.apply(x, num_groups, weight, bias, eps)


class NormIdentity(SwappedForward):
    """The identity rule on ``nn.LayerNorm`` and ``nn.RMSNorm`` (normalising the last dimensions), and on
    the RMSNorms of model libraries.

    ``kind`` (``'layer_norm'`` or ``'rms_norm'``) vouches that a module with a forward of its own
    still normalises the last dimensions (``normalized_shape``'s, or the last one if it has none) the
    same way: timm's LayerNorm and RmsNorm, transformers' ``LlamaRMSNorm`` family (epsilon in ``eps`` or
    ``variance_epsilon``) and LayerNorms of model libraries (weight and bias optional). Without it, only
    modules running torch's own forward are accepted (timm's LayerNorm2d, which normalises channels,
    would be silently wrong). ``weight_offset`` is 1 for Gemma's ``(1 + w)`` scaling (see
    ``rms_norm_identity``); ``eps`` replaces the module's epsilon (for norms that hard-code theirs).

    Parameters
    ----------
    kind : {None, 'layer_norm', 'rms_norm'}, optional
        The form the module's forward vouches for (default None: torch's own modules only).
    weight_offset : float, optional
        The RMSNorm's weight offset, 0 (default) or 1.
    eps : float, optional
        The epsilon to use instead of the module's (default None: the module's).
    """

    _KINDS = {torch.nn.LayerNorm: 'layer_norm', torch.nn.RMSNorm: 'rms_norm'}

    def __init__(self, kind=None, weight_offset=0., eps=None):
        super().__init__()
        if kind not in (None, 'layer_norm', 'rms_norm'):
            raise ValueError(f"kind must be None, 'layer_norm' or 'rms_norm', got {kind!r}")
        self.kind = kind
        self.weight_offset = float(weight_offset)
        self.eps = eps

    def prepare(self, module):
        if self.kind == 'rms_norm' and not hasattr(module, 'normalized_shape'):
            if _rms_epsilon(module) is None and self.eps is None:
                raise UnsupportedLayerError(f'{type(module).__name__}: an RMSNorm with an eps is expected')
            return
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
        shape = tuple(getattr(module, 'normalized_shape', (None,)))
        if kind == 'layer_norm':
            # a model library's LayerNorm may lack a weight or bias (OLMo's, Cohere's) or keep eps elsewhere
            weight, bias = getattr(module, 'weight', None), getattr(module, 'bias', None)
            eps = self.eps if self.eps is not None else module.eps
            if shape == (None,):
                shape = (input.shape[-1],)
            return layer_norm_identity(input, shape, weight, bias, eps)
        eps = self.eps if self.eps is not None else _rms_epsilon(module)
        eps = eps if eps is not None else torch.finfo(input.dtype).eps
        return rms_norm_identity(input, getattr(module, 'weight', None), eps, self.weight_offset,
                                 normalized_ndim=len(shape))


def _rms_epsilon(module):
    """An RMSNorm's epsilon: torch's and timm's ``eps`` (None: the dtype's), transformers' ``variance_epsilon``."""
    for name in ('eps', 'variance_epsilon'):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None
