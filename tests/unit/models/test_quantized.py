"""Quantized Linear layers in lxt_ext's transformer composites, on the CPU: bitsandbytes 4-bit (nf4, fp4) and
torchao's int8 weight-only (``Int8WeightOnlyConfig``: an ``nn.Linear`` whose weight is an ``Int8Tensor``).

Oracle: the same model with its weights dequantized up front (each ``Linear4bit`` replaced by an
``nn.Linear`` holding bitsandbytes' own dequantization of its weight), explained with the same
composite: the relevance must be the same, while the quantized model never holds more than one layer's
weight in full precision (peak memory, measured as DESIGN.md says: a fresh process, glibc's allocator
returning freed blocks at once, VmHWM after a reset minus VmRSS before). bitsandbytes' 8-bit layers are
refused by name.
"""
import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, require_module

transformers = require_module('transformers')
bnb = require_module('bitsandbytes')

from harness.memory import MEMORY_ENV  # noqa: E402  (python/benchmarks/, on sys.path from conftest)
from lxt_ext.attribution import Explainer, explain_batch  # noqa: E402
from lxt_ext.composites import LanguageTransformer  # noqa: E402
from lxt_ext.layers import UnsupportedLayerError  # noqa: E402

CONFIG = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)


def replace_linear(model, make):
    """Every ``nn.Linear`` of ``model`` replaced by ``make(linear)``."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, make(child))
    return model


def to_4bit(quant_type):
    def make(linear):
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, quant_type=quant_type)
        layer.load_state_dict(linear.state_dict())
        return layer.to('cpu')  # bitsandbytes quantizes when the layer is moved to a device
    return make


def dequantized(layer):
    """An ``nn.Linear`` with the library's own dequantization of ``layer``'s weight."""
    linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    weight = layer.weight
    weight = (bnb.functional.dequantize_4bit(weight.data, weight.quant_state) if isinstance(layer, bnb.nn.Linear4bit)
              else weight.dequantize())
    linear.weight = torch.nn.Parameter(weight.detach().clone())
    linear.bias = layer.bias
    return linear


def models(quant_type):
    """A LLaMA with quantized Linear layers (bitsandbytes 4-bit ``'nf4'``/``'fp4'``, or torchao's int8
    weight-only ``'int8'``), and the same model dequantized up front."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()
    x = model.get_input_embeddings()(torch.randint(0, 64, (2, 10))).detach()
    reference = copy.deepcopy(model)
    if quant_type == 'int8':
        torchao = require_module('torchao')
        torchao.quantization.quantize_(model, torchao.quantization.Int8WeightOnlyConfig())
    else:
        replace_linear(model, to_4bit(quant_type))
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear):
            parent, _, child = name.rpartition('.')
            setattr(reference.get_submodule(parent), child, dequantized(layer))
    return model, reference, x


def logits(model, x):
    return model(inputs_embeds=x).logits


@pytest.mark.parametrize('linear_rule', ['epsilon', 'gamma'])
@pytest.mark.parametrize('mode', ['attnlrp', 'cp'])
@pytest.mark.parametrize('quant_type', ['nf4', 'fp4', 'int8'])
def test_relevance_equals_the_model_dequantized_up_front(quant_type, mode, linear_rule):
    model, reference, x = models(quant_type)
    quantized = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(quantized) == 15 and not any(type(m.weight) is torch.nn.Parameter for m in quantized)
    results = {}
    for key, m in (('quantized', model), ('reference', reference)):
        with Explainer(m, LanguageTransformer(attention=mode, gamma=0.25 if linear_rule == 'gamma' else None),
                       forward=logits) as attributor:
            results[key] = attributor(x, 5)
    torch.testing.assert_close(results['quantized'][0], results['reference'][0], rtol=1e-5, atol=1e-5)
    relevance, expected = results['quantized'][1], results['reference'][1]
    assert expected.abs().max() > 0
    error = (relevance - expected).abs().max() / expected.abs().max()
    assert error <= 1e-5, f'max |difference| = {error:.2e} x max |relevance of the dequantized model|'
    # the quantized weights are what they were
    assert all(type(m.weight) is type(quantized[0].weight) for m in quantized)


def test_a_weight_dequantized_in_bfloat16_meets_a_float32_input_and_bias():
    """bitsandbytes' CPU path may dequantize a float32-compute layer's weight in bfloat16 (its scales repacked in
    bfloat16, stood in for here by the quant state's dtype) while input and bias stay float32: the rule computes
    in the input's dtype, equal to an nn.Linear holding that weight."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    linear.bias.data.uniform_(-1, 1)
    layer = to_4bit('nf4')(linear)
    layer.weight.quant_state.dtype = torch.bfloat16
    reference = dequantized(layer)
    assert reference.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.float32
    reference.weight = torch.nn.Parameter(reference.weight.detach().float())
    torch.manual_seed(1)
    first = torch.nn.Linear(16, 16)
    x = torch.randn(3, 16)
    relevance = explain_batch(torch.nn.Sequential(first, layer), x, LanguageTransformer(), target=1).relevance
    expected = explain_batch(torch.nn.Sequential(first, reference), x, LanguageTransformer(), target=1).relevance
    assert relevance.dtype == torch.float32
    torch.testing.assert_close(relevance, expected, rtol=1e-5, atol=1e-6)


def test_8bit_layers_are_refused_by_name():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval()

    def to_8bit(linear):
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False)
        layer.load_state_dict(linear.state_dict())
        return layer.to('cpu')
    replace_linear(model, to_8bit)
    with pytest.raises(UnsupportedLayerError, match='Linear8bitLt'):
        LanguageTransformer().register(model)
    assert not any('_lxt_ext_rule' in vars(module) or 'forward' in vars(module) for module in model.modules())


def test_an_unquantized_4bit_layer_is_a_clear_error():
    layer = bnb.nn.Linear4bit(8, 4, compute_dtype=torch.float32)  # not yet moved to a device: not quantized
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), layer)
    with pytest.raises(UnsupportedLayerError, match='no quantized weight yet'):
        LanguageTransformer().register(model)


PEAK = '''
import sys, torch
sys.path[:0] = [{tests!r}, {here!r}]
torch.set_num_threads(2)
import test_quantized as t
from lxt_ext.attribution import Explainer
from harness.memory import extra_peak_mb
from lxt_ext.composites import LanguageTransformer
t.CONFIG.update(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=256)
model, reference, x = t.models('nf4')
del reference
x = x[:1, :8]
full = sum(m.in_features * m.out_features * 4 for m in model.modules() if isinstance(m, t.bnb.nn.Linear4bit))
largest = max(m.in_features * m.out_features * 4 for m in model.modules() if isinstance(m, t.bnb.nn.Linear4bit))
def run():
    with Explainer(model, LanguageTransformer(gamma=0.25), forward=t.logits) as attributor:
        attributor(x, 5)
run()  # warm-up: one-time allocations
print(extra_peak_mb(run), full / 2 ** 20, largest / 2 ** 20)
'''


def test_peak_memory_holds_one_layer_in_full_precision_at_a_time():
    """A 4-layer LLaMA (hidden 512, MLP 1536: 54 MB of float32 Linear weights, 7 MB in nf4), gamma on
    every Linear (the rule with the most weight-sized temporaries), batch 1 x 8 tokens: the attribution's
    extra peak stays below a third of a full-precision copy of the Linear weights."""
    script = PEAK.format(tests=os.path.join(ROOT, 'tests'), here=os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(script)], env=dict(os.environ, **MEMORY_ENV),
                            capture_output=True, text=True, check=True)
    peak, full, largest = map(float, result.stdout.strip().splitlines()[-1].split())
    assert peak < full / 3, f'extra peak {peak:.1f} MB; float32 Linear weights {full:.1f} MB (largest {largest:.1f})'


@pytest.mark.parametrize('mode', ['attnlrp', 'cp'])
def test_audit_finds_no_uncovered_operation(mode):
    from lxt_ext.diagnostics import audit
    model, _, x = models('nf4')
    audit(model, x, forward=logits, composite=LanguageTransformer(attention=mode)).check()


def test_zennit_composites_refuse_a_4bit_layer_by_name():
    """lxt_ext's CNN composites (zennit's layer maps) put the fused Linear rule on every ``nn.Linear``,
    which a ``Linear4bit`` is by class; its packed weight must give an error naming the layer, never
    relevance from the packed bytes."""
    from zennit.attribution import Gradient
    from lxt_ext.composites import EpsilonPlus
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                to_4bit('nf4')(torch.nn.Linear(16, 4))).eval()
    x = torch.randn(2, 16)
    with pytest.raises(TypeError, match='Linear4bit'):
        with Gradient(model, EpsilonPlus()) as attributor:
            attributor(x, torch.eye(4)[[0, 1]])


def test_removal_restores_the_quantized_model():
    """After an attribution a 4-bit model is bitwise as before: outputs, plain gradients, the same packed
    weight objects in the same parameter order, attributes and hooks (``support.Snapshot``)."""
    from support import ForwardOf, Snapshot, freeze_unused, no_lxt_ext_left
    model, _, x = models('nf4')
    wrapped = ForwardOf(model, logits)
    freeze_unused(wrapped, x)
    snapshot = Snapshot(wrapped, x)
    with Explainer(wrapped, LanguageTransformer(), forward=lambda model, x: model(x)) as attributor:
        attributor(x, 5)
    snapshot.assert_same(wrapped, x)
    no_lxt_ext_left(wrapped)


def test_removal_restores_the_int8_model():
    """torchao's tensors support no ``torch.equal`` (the snapshot's state comparison): the same weight
    objects in the same order in every layer, the plain output bitwise, nothing of lxt_ext left."""
    from support import no_lxt_ext_left
    model, _, x = models('int8')
    def parameters():
        return [(name, key, id(value)) for name, module in model.named_modules()
                for key, value in module._parameters.items()]
    before = parameters()
    with torch.no_grad():
        expected = logits(model, x)
    with Explainer(model, LanguageTransformer(), forward=logits) as attributor:
        attributor(x, 5)
    assert parameters() == before
    with torch.no_grad():
        assert torch.equal(logits(model, x), expected)
    no_lxt_ext_left(model)
