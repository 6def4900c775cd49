"""Hugging Face transformers in lxt_ext's transformer composites: the table of classes by name.

Models are matched by class name (no modeling module is imported), with fallbacks for classes not named here:
attention modules that dispatch through transformers' registry (``attention``), experts modules
(``experts``), ``*TopKRouter``/``*TopkRouter`` routers, ``*DropPath``, and ``*RMSNorm`` / ``*LayerNorm`` /
``*MLP`` modules whose output on a random probe is that of a rule's formula (``probes``). Attention modules that
compute attention in their own forward (GPT-Neo, BLOOM's ALiBi, DeBERTa's disentangled terms) get no entry: the
operation rules (``lxt_ext.operations``) give their matrix products, softmax and scaling their rules.

Gated MLPs get the uniform rule on the product (AttnLRP) or a gate held constant (CP-LRP, as LXT); activation
modules the identity rule; RMSNorms (T5's included) the identity rule on the normalisation; GPT-2's ``Conv1D``
the composite's Linear rule; a final-logit softcap (Gemma 2) the identity rule; mixture-of-experts routers are
held constant (``lxt_ext.transformer.experts``); Mamba-1 and Mamba-2 mixers get MambaLRP's rule
(``lxt_ext.transformer.ssm``), other state-space and linear-attention mixers (an ``A_log`` parameter) are refused
by name.
"""
import torch

from ...transformer.elementwise import ActivationIdentity, DropoutOff
from ...transformer.experts import DenseExperts, RouterConstant
from ...transformer.mlp import FusedGatedMLP, GatedMLP
from ...transformer.norms import NormIdentity
from ...transformer.ssm import SelectiveSSM
from .. import KeepGradient, Refused, matcher
from .attention import HFAttention
from .experts import HFExperts, SharedExpertMoE
from .heads import Conv1DRule, FinalLogitSoftcap, GeluLMHead, TanhClassificationHead
from .probes import computes_gated_mlp, dispatches_attention, dispatches_experts, layer_norm_eps, rms_norm_offset

__all__ = ['transformers_rule', 'HFAttention', 'HFExperts', 'SharedExpertMoE', 'Conv1DRule', 'FinalLogitSoftcap',
           'GeluLMHead', 'TanhClassificationHead']

# Classes by name, so that supporting an architecture imports nothing. Attention modules of
# architectures not named here are found by probes.dispatches_attention, experts modules by
# probes.dispatches_experts.
_ATTENTION = {
    'LlamaAttention', 'MistralAttention', 'MixtralAttention', 'Qwen2Attention', 'Qwen3Attention', 'Qwen3MoeAttention',
    'GemmaAttention', 'Gemma2Attention', 'Gemma3Attention', 'Phi3Attention', 'GPT2Attention', 'BertSelfAttention',
    'RobertaSelfAttention', 'T5Attention', 'ViTSelfAttention', 'ViTAttention', 'DeiTAttention', 'Dinov2Attention',
    'Dinov2WithRegistersAttention', 'CLIPAttention', 'SiglipAttention',
}
# Gated MLPs: attribute names of gate, up, down projections and the activation.
_GATED_MLP = {name: GatedMLP.NAMES for name in (
    'LlamaMLP', 'MistralMLP', 'Qwen2MLP', 'Qwen3MLP', 'Qwen3MoeMLP', 'GemmaMLP', 'Gemma2MLP', 'Gemma3MLP',
    'Dinov2SwiGLUFFN', 'Dinov2WithRegistersSwiGLUFFN')}
_GATED_MLP['Llama4TextMLP'] = ('gate_proj', 'up_proj', 'down_proj', 'activation_fn')
_GATED_MLP['T5DenseGatedActDense'] = ('wi_0', 'wi_1', 'wo', 'act')
# Fused gated MLPs: attribute names of the fused gate/up projection, the down projection and the activation.
_FUSED_GATED_MLP = {name: FusedGatedMLP.NAMES for name in ('Phi3MLP', 'GlmMLP', 'Glm4MLP')}
_FUSED_GATED_MLP['ModernBertMLP'] = ('Wi', 'Wo', 'act')
_SHARED_EXPERT_MOE = {'Qwen2MoeSparseMoeBlock'}
_RMS_NORM = {'LlamaRMSNorm': 0., 'MistralRMSNorm': 0., 'MixtralRMSNorm': 0., 'Qwen2RMSNorm': 0., 'Qwen3RMSNorm': 0.,
             'Qwen3MoeRMSNorm': 0., 'Phi3RMSNorm': 0., 'T5LayerNorm': 0.,
             'GemmaRMSNorm': 1., 'Gemma2RMSNorm': 1., 'Gemma3RMSNorm': 1.,
             'Llama4TextRMSNorm': 0., 'Llama4TextL2Norm': 0.}  # L2Norm: an RMSNorm without weight
_ACTIVATIONS = {
    'GELUActivation', 'NewGELUActivation', 'GELUTanh', 'PytorchGELUTanh', 'FastGELUActivation', 'QuickGELUActivation',
    'AccurateGELUActivation', 'ClippedGELUActivation', 'SiLUActivation', 'MishActivation', 'ReLUSquaredActivation',
    'LaplaceActivation', 'XIELUActivation', 'BloomGelu',  # BloomGelu: an autograd Function of its own
}
_ROUTERS = {'MixtralTopKRouter', 'Qwen3MoeTopKRouter', 'Llama4Router'}
_DENSE_EXPERTS = {'Llama4TextExperts'}
# RoBERTa-style heads with a functional tanh (classification) or gelu (masked LM)
_ROBERTA_LIKE = ('Roberta', 'XLMRoberta', 'Camembert', 'Data2VecText')
_TANH_HEADS = {f'{name}ClassificationHead' for name in _ROBERTA_LIKE}
_GELU_LM_HEADS = {f'{name}LMHead' for name in _ROBERTA_LIKE}
_FINAL_LOGIT_SOFTCAP = {'Gemma2ForCausalLM', 'Gemma3ForCausalLM'}
# Off the relevance path (position tables; rotary embeddings, matched by suffix too) or linear in their
# relevance-carrying input (LayerScale: a product with a parameter; drop path: off in eval mode).
_KEEP_GRADIENT = {'LinearActivation', 'Gemma3TextScaledWordEmbedding', 'Dinov2LayerScale', 'Dinov2DropPath',
                  'Dinov2WithRegistersLayerScale', 'Dinov2WithRegistersDropPath'}



@matcher
def transformers_rule(module, options):
    cls = type(module)
    if not cls.__module__.startswith('transformers.'):
        return None
    name = cls.__name__
    if isinstance(getattr(module, 'A_log', None), torch.nn.Parameter):  # a state-space or linear-attention mixer
        if SelectiveSSM.takes(module):
            return SelectiveSSM('x_proj')  # Mamba-1 or Mamba-2 form: MambaLRP
        return Refused('a state-space or linear-attention mixer (gated delta rule, ...) for which lxt_ext has no '
                       'MambaLRP-style rule yet (Mamba-1 and Mamba-2 mixers are covered)')
    if name in _ATTENTION or (name not in _GATED_MLP and dispatches_attention(module)):
        return HFAttention(options.attention, options.input_stabilizer)
    if dispatches_experts(module):
        return HFExperts(options.attention, None if options.linear is None else options.linear.copy())
    if name in _DENSE_EXPERTS:
        return DenseExperts(options.attention, None if options.linear is None else options.linear.copy())
    if name in _ROUTERS or (name.endswith(('TopKRouter', 'TopkRouter'))
                            and isinstance(getattr(module, 'weight', None), torch.Tensor)):
        return RouterConstant()
    if name in _GATED_MLP:
        return GatedMLP(options.attention, _GATED_MLP[name])
    if name.endswith('MLP') and computes_gated_mlp(module, GatedMLP):
        return GatedMLP(options.attention)
    if name in _FUSED_GATED_MLP:
        return FusedGatedMLP(options.attention, _FUSED_GATED_MLP[name])
    if name.endswith('MLP') and computes_gated_mlp(module, FusedGatedMLP):
        return FusedGatedMLP(options.attention)
    if name in _SHARED_EXPERT_MOE:
        return SharedExpertMoE()
    if name in _RMS_NORM:
        return NormIdentity(kind='rms_norm', weight_offset=_RMS_NORM[name])
    if name.endswith('RMSNorm'):
        offset = rms_norm_offset(module)
        if offset is not None:
            return NormIdentity(kind='rms_norm', weight_offset=offset)
    if name.endswith('LayerNorm') and not isinstance(module, torch.nn.LayerNorm):
        eps = layer_norm_eps(module)
        if eps is not None:
            return NormIdentity(kind='layer_norm', eps=eps)
    if name in _ACTIVATIONS:
        return ActivationIdentity(options.input_stabilizer)
    if name == 'Conv1D':
        if options.linear is None:
            raise ValueError('transformers Conv1D layers need the composite\'s Linear rule (Options.linear)')
        return Conv1DRule(options.linear.copy())
    if name in _TANH_HEADS:
        return TanhClassificationHead(options.input_stabilizer)
    if name in _GELU_LM_HEADS:
        return GeluLMHead(options.input_stabilizer)
    if name in _FINAL_LOGIT_SOFTCAP and getattr(module.config, 'final_logit_softcapping', None) is not None:
        return FinalLogitSoftcap(options.input_stabilizer)
    if name in _KEEP_GRADIENT or name.endswith(('RotaryEmbedding', 'DropPath')):
        return KeepGradient()
    if isinstance(module, torch.nn.Dropout):
        return DropoutOff()
    return None

