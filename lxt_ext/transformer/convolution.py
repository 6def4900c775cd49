"""Convolutions computed in a module's own forward: timm's ``Conv2dSame`` (padding worked out from the input),
weight-standardised convolutions (timm's ``StdConv2d``, BiT's), or ``F.conv*`` called by model code. The
module's weight is not what the forward convolves with, or the input is padded first, so a rule on the module as
``nn.Conv2d`` would take the wrong product: the convolution call itself gets the rule (``FusedRule.convolution``).
"""
import torch
from torch.overrides import TorchFunctionMode

from ..core import SwappedForward
from ..errors import NotExplainableError

__all__ = ['CONVOLUTIONS', 'TORCH_CONVOLUTION_FORWARDS', 'OwnForwardConvolution', 'convolution_arguments']

CONVOLUTIONS = frozenset({'conv1d', 'conv2d', 'conv3d', 'conv_transpose1d', 'conv_transpose2d', 'conv_transpose3d'})
TORCH_CONVOLUTION_FORWARDS = tuple(cls.forward for cls in (
    torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d))
_PARAMETERS = ('input', 'weight', 'bias', 'stride', 'padding', 'dilation', 'groups')
_TRANSPOSED_PARAMETERS = ('input', 'weight', 'bias', 'stride', 'padding', 'output_padding', 'groups', 'dilation')
# What an own forward may do to its input before convolving it: zero padding, views and casts (linear, each
# element kept or a zero added, so the plain gradient is the identity rule there)
_PASSING = frozenset({'pad', 'constant_pad_nd', 'contiguous', 'to', 'float', 'double', 'half', 'bfloat16', 'type_as',
                      'view', 'reshape', 'permute', 'transpose', 'squeeze', 'unsqueeze', 'flatten', 'clone'})


def convolution_arguments(name, args, kwargs):
    """The arguments of ``torch.nn.functional.<name>(*args, **kwargs)`` (a name of ``CONVOLUTIONS``) as
    ``FusedRule.convolution`` takes them.

    Parameters
    ----------
    name : str
        ``conv1d`` ... ``conv_transpose3d``.
    args, kwargs : tuple, dict
        The call's arguments.

    Returns
    -------
    dict
        ``x, weight, bias, stride, padding, dilation, groups, transposed, output_padding``.
    """
    transposed = name.startswith('conv_transpose')
    bound = dict(zip(_TRANSPOSED_PARAMETERS if transposed else _PARAMETERS, args), **kwargs)
    return dict(x=bound['input'], weight=bound['weight'], bias=bound.get('bias'), stride=bound.get('stride', 1),
                padding=bound.get('padding', 0), dilation=bound.get('dilation', 1), groups=bound.get('groups', 1),
                transposed=transposed, output_padding=bound.get('output_padding', 0))


class _Convolutions(TorchFunctionMode):
    """Routes the convolutions of one module's forward on the tensors it carries from the input through
    ``rule.convolution``; any other operation on them than ``_PASSING`` is refused."""

    def __init__(self, rule, module, input):
        super().__init__()
        self.rule, self.module, self.carried = rule, module, {input: True}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', '')
        values = (*args, *kwargs.values())
        if not any(isinstance(value, torch.Tensor) and value in self.carried for value in values):
            return func(*args, **kwargs)
        if name in CONVOLUTIONS:
            return self.rule.convolution(**convolution_arguments(name, args, kwargs))
        output = func(*args, **kwargs)
        if not isinstance(output, torch.Tensor):
            return output  # sizes, shapes, dims
        if name not in _PASSING:
            raise NotExplainableError(
                f'{type(self.module).__name__} is a convolution with a forward of its own that applies {name!r} to '
                f'its input, which no rule covers; give the module a rule of its own (the composite\'s layer_map)')
        self.carried[output] = True
        return output


class OwnForwardConvolution(SwappedForward):
    """A convolution module with a forward of its own (see the module doc): its forward runs as written, and
    each convolution it applies to its input takes ``rule`` (a fused rule, ``FusedRule.convolution``).

    Parameters
    ----------
    rule : lxt_ext.core.FusedRule
        The composite's convolution rule (in its convention).
    """

    def __init__(self, rule):
        super().__init__()
        if not hasattr(rule, 'convolution'):
            raise NotExplainableError(
                f'{type(rule).__name__} cannot take a convolution called in a module\'s own forward (timm\'s '
                f'Conv2dSame, weight-standardised convolutions); lxt_ext\'s fused rules can')
        self.rule = rule

    def convolution(self, *args, **kwargs):
        """``FusedRule.convolution`` of the rule (so that ``emitting_relevance`` takes this on a first layer)."""
        return self.rule.convolution(*args, **kwargs)

    def apply(self, module, original, input, args, kwargs):
        with _Convolutions(self.rule, module, input):
            return original(input, *args, **kwargs)
