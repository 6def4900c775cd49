"""torch.nn's built-in layers in lxt_ext's transformer composites: the table every model starts from.

Linear layers and convolutions (zennit's ``Linear`` types) get the composite's rule templates (a Linear
layer whose weight is a quantized tensor subclass, torchao's, the rule on its dequantized weight),
element-wise activations the identity rule, LayerNorm/RMSNorm the identity rule on the
normalisation, dropout none (off), ``nn.MultiheadAttention`` AttnLRP or CP-LRP with its projections
(which it calls functionally, out of zennit's reach) under the composite's Linear rule. Leaves that
are linear in their relevance-carrying input or off the relevance path keep the plain gradient.
"""
import torch
from zennit.types import Convolution

from ..attention import MultiheadAttentionRule
from ..transformer.convolution import TORCH_CONVOLUTION_FORWARDS, OwnForwardConvolution
from ..transformer.elementwise import ActivationIdentity, DropoutOff
from ..transformer.norms import NormIdentity
from . import KeepGradient, adapter, matcher
from .quantized import DequantizedLinear, is_quantized

__all__ = ['ELEMENTWISE_ACTIVATIONS']

ELEMENTWISE_ACTIVATIONS = (
    torch.nn.GELU, torch.nn.SiLU, torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.SELU,
    torch.nn.CELU, torch.nn.Tanh, torch.nn.Sigmoid, torch.nn.Mish, torch.nn.Softplus, torch.nn.Hardswish,
    torch.nn.Hardsigmoid, torch.nn.Hardtanh,
)


@matcher
def _products(module, options):
    if isinstance(module, torch.nn.Linear):
        if options.linear is not None and is_quantized(module.weight):  # torchao: a quantized tensor subclass
            return DequantizedLinear(options.linear.copy())
        if type(module).__module__.startswith('transformers.') and type(module).forward is not torch.nn.Linear.forward:
            return None  # a transformers module that is a Linear with a forward of its own (Llama 4's router)
        return options.linear
    if isinstance(module, Convolution):
        if type(module).forward not in TORCH_CONVOLUTION_FORWARDS:
            # its own forward pads the input or standardises the weight first (timm's Conv2dSame, StdConv2d): the
            # convolution it calls takes a fused rule, or (no rule that takes it) the operation rules take its calls
            return OwnForwardConvolution(options.conv) if hasattr(options.conv, 'convolution') else None
        return options.conv
    return None


@adapter(*ELEMENTWISE_ACTIVATIONS)
def _activation(module, options):
    return ActivationIdentity(options.input_stabilizer)


@adapter(torch.nn.LayerNorm, torch.nn.RMSNorm)
def _norm(module, options):
    if type(module).forward not in (torch.nn.LayerNorm.forward, torch.nn.RMSNorm.forward):
        return None  # a subclass with a forward of its own (timm's LayerNorm2d): the operation rules take its ops
    return NormIdentity()


@adapter(torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout)
def _dropout(module, options):
    return DropoutOff()


@adapter(torch.nn.Identity, torch.nn.Flatten, torch.nn.Unflatten, torch.nn.Embedding)
def _linear_or_off_path(module, options):
    return KeepGradient()


@adapter(torch.nn.MultiheadAttention)
def _multihead_attention(module, options):
    return MultiheadAttentionRule(options.attention, options.linear)
