"""bitsandbytes' quantized Linear layers in lxt_ext's transformer composites: the table.

``Linear4bit`` (nf4, fp4): the composite's Linear rule on its weight dequantized one layer at a time
(``quantized.DequantizedLinear``). ``Linear8bitLt`` (LLM.int8) also quantizes the layer input in its
forward, so no rule on a dequantized weight gives its output: refused by name.
"""
import bitsandbytes

from ..layers import UnsupportedLayerError
from . import Refused, adapter
from .quantized import DequantizedLinear


@adapter(bitsandbytes.nn.Linear4bit)
def _linear_4bit(module, options):
    return DequantizedLinear(None if options.linear is None else options.linear.copy())


@adapter(bitsandbytes.nn.Linear8bitLt)
def _linear_8bit(module, options):
    return Refused('LLM.int8 quantizes the layer input as well, so no rule on a dequantized weight gives its '
                   'output; lxt_ext does not cover 8-bit bitsandbytes layers (use 4-bit, or dequantize the model)',
                   UnsupportedLayerError)
