"""Which modules the fused rules accept, and how their product is described to the C++ op.

Every layer zennit types as ``Linear`` is a product ``y = W x + b``: ``torch.nn.Linear`` or a
(transposed) convolution of any dimension, stride, padding, dilation and groups.
"""
from dataclasses import dataclass
from typing import Tuple

import torch
from zennit.types import Convolution, ConvolutionTranspose

from .errors import UnsupportedLayerError  # noqa: F401  (raised here, imported from here by the rules)



@dataclass(frozen=True)
class LayerSpec:
    """The product of one layer, as ``torch.ops.lxt_ext.lrp_backward`` takes it."""
    linear: bool
    transposed: bool = False
    stride: Tuple[int, ...] = ()
    padding: Tuple[int, ...] = ()
    dilation: Tuple[int, ...] = ()
    groups: int = 1

    @classmethod
    def of(cls, module):
        if isinstance(module, torch.nn.Linear):
            return cls(linear=True)
        if not isinstance(module, Convolution):
            raise UnsupportedLayerError(
                f'lxt_ext rules take Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d modules, not '
                f'{type(module).__name__}; place zennit\'s rules (or none) on it instead'
            )
        if module.padding_mode != 'zeros':
            raise UnsupportedLayerError(
                f'{type(module).__name__} with padding_mode={module.padding_mode!r} is not supported by lxt_ext '
                f'rules (only zero padding); use zennit\'s rule for this layer'
            )
        return cls(
            linear=False,
            transposed=isinstance(module, ConvolutionTranspose),
            stride=tuple(module.stride),
            padding=_explicit_padding(module),
            dilation=tuple(module.dilation),
            groups=module.groups,
        )

    def product(self, x, weight, output_padding, bias=None):
        """``W x`` (``W x + b`` given ``bias``): the layer's own product, through ATen."""
        if self.linear:
            return torch.nn.functional.linear(x, weight, bias)
        return torch.ops.aten.convolution(x, weight, bias, self.stride, self.padding, self.dilation, self.transposed,
                                          output_padding, self.groups)

    def input_product(self, s, weight, x, output_padding):
        """``W^T s``: the gradient of ``W x`` w.r.t. ``x`` for the output gradient ``s`` (``x`` gives the shape)."""
        if self.linear:
            return s @ weight
        return torch.ops.aten.convolution_backward(
            s, x, weight, None, self.stride, self.padding, self.dilation, self.transposed, output_padding,
            self.groups, [True, False, False])[0]

    def output_padding(self, weight, input_shape, output_shape):
        """A transposed convolution's output padding, read off the shapes its forward produced (so
        ``forward(x, output_size=...)`` is covered as well)."""
        if not self.transposed:
            return [0] * len(self.stride)
        kernel = weight.shape[2:]
        spatial_in, spatial_out = input_shape[-len(kernel):], output_shape[-len(kernel):]
        return [
            out - ((inp - 1) * s - 2 * p + d * (k - 1) + 1)
            for inp, out, s, p, d, k in zip(spatial_in, spatial_out, self.stride, self.padding, self.dilation, kernel)
        ]


def _explicit_padding(module):
    if module.padding == 'valid':
        return (0,) * len(module.kernel_size)
    if module.padding == 'same':
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(total % 2 for total in totals):
            raise UnsupportedLayerError(
                f'{module}: padding=\'same\' with an even kernel pads asymmetrically, which lxt_ext rules do not '
                f'support yet; pad explicitly or use zennit\'s rule for this layer'
            )
        return tuple(total // 2 for total in totals)
    return tuple(module.padding)


def check_input(module, input, weight=None):
    """Clear errors for inputs the layer's own forward would reject with less helpful messages
    (``weight``: the parameter the input meets, default ``module.weight``)."""
    weight = module.weight if weight is None else weight
    if not isinstance(input, torch.Tensor):
        raise TypeError(f'{type(module).__name__}: lxt_ext rules need a tensor input, got {type(input).__name__}')
    if not input.is_floating_point():
        raise TypeError(f'{type(module).__name__}: lxt_ext rules need a floating input, got {input.dtype}')
    if input.dtype != weight.dtype:
        raise TypeError(
            f'{type(module).__name__}: input dtype {input.dtype} differs from the weight dtype {weight.dtype}'
        )
    if input.device != weight.device:
        raise ValueError(
            f'{type(module).__name__}: input on {input.device} but the weight on {weight.device}'
        )
