"""Hugging Face transformers in lxt_ext's transformer composites: the per-architecture table.

Attention. transformers (4.48 and later, 5.x) routes every attention call of LLaMA, Qwen, Gemma,
Mistral, GPT-2, BERT, T5, ViT, CLIP, SigLIP, DINOv2, ... through
``ALL_ATTENTION_FUNCTIONS[module.config._attn_implementation]``. lxt_ext registers two entries there
(``lxt_ext_attnlrp``, ``lxt_ext_cp``), and the attention rule points one module, and only that module,
at them by giving it a view of its config whose ``_attn_implementation`` names lxt_ext's entry.
Nothing global is patched; removing the rule gives the module its own config object back. The fused
op then does the AttnLRP (or CP-LRP) backward without an N x N matrix. T5's relative position bias is
a constant added to the scores (an additive mask of the fused op). Gemma 2's attention softcap
``c tanh(s / c)`` gets the identity rule (a monotone element-wise map of the scores) in an eager
attention that forms the N x N scores (the fused op has no softcap).

Mixture of experts. transformers 5 keeps the experts of a block as one module with 3-D
``gate_up_proj``/``down_proj`` parameters run through ``ALL_EXPERTS_FUNCTIONS[config._experts_implementation]``;
the experts rule points the module at lxt_ext's entries there the same way, which run each expert's
projections under the composite's Linear rule and its gated product under the gated-MLP rule. The
router is held constant: it runs without grad, so its routing weights scale the experts' outputs as
constants and the router gets no relevance. (A routing weight multiplies an expert's output, both
computed from the same tokens: a product of two relevance-carrying factors, like a gate. Held
constant, as CP-LRP holds the attention weights, all of the block's relevance flows through the
experts, conservation holds, and the top-k selection, piecewise constant, has no gradient anyway.)

MLPs. Gated MLPs (``down(act(gate(x)) * up(x))``: LLaMA/Qwen/Mistral/Gemma, DINOv2's SwiGLU, Flan-T5's
gated-GELU; or fused ``gate_up_proj`` as in Phi-3) get the uniform rule on the product (AttnLRP) or a
gate held constant (CP-LRP, as LXT); activation modules get the identity rule; RMSNorms (T5's
included) the identity rule on the normalisation; GPT-2's ``Conv1D`` (``x W + b``) the composite's
Linear rule; a final-logit softcap (Gemma 2) the identity rule. Models are matched by class name (no
modeling module is imported), with fallbacks for classes not named here: attention modules that
dispatch through the registry, experts modules, ``*TopKRouter``/``*TopkRouter`` routers, ``*DropPath``, and ``*RMSNorm``
/ ``*MLP`` modules whose output on a random probe at registration is LLaMA's or Gemma's RMSNorm / a
gated MLP (checked numerically, so a module of another form is reported as unmapped, never given a
wrong rule). Attention modules known to compute attention in their own forward are refused by name.
"""
import inspect
import sys

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from zennit.core import Hook, RemovableHandle, RemovableHandleList

from ..attention import attention_lrp
from ..checks import first_order
from ..core import SwappedForward, rule_of
from ..ops import ATTENTION_MODES
from ..transformer.convention import linear_rule_apply
from ..transformer.elementwise import ActivationIdentity, DropoutOff, identity_rule, uniform_product
from ..transformer.norms import NormIdentity
from . import KeepGradient, Refused, matcher

try:  # transformers 5: experts as one module with 3-D weights, dispatched through a registry
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, _default_apply_gate
except ImportError:  # pragma: no cover - transformers 4.x keeps experts as a ModuleList of MLPs
    ALL_EXPERTS_FUNCTIONS = ExpertsInterface = _default_apply_gate = None

# The entries lxt_ext adds to transformers' attention- and experts-function registries, by attention mode.
_IMPLEMENTATIONS = {mode: f'lxt_ext_{mode}' for mode in ATTENTION_MODES}


class _ConfigView:
    """A module's config with some attributes replaced (lxt_ext's attention or experts implementation,
    a softcap taken over by a rule); everything else reads and writes through."""

    def __init__(self, config, hook, **overrides):
        object.__setattr__(self, '_lxt_ext_config', config)
        object.__setattr__(self, '_lxt_ext_hook', hook)
        for name, value in overrides.items():
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        return getattr(self._lxt_ext_config, name)

    def __setattr__(self, name, value):
        setattr(self._lxt_ext_config, name, value)


class _ConfigViewRule(Hook):
    """A rule that gives its module a ``_ConfigView`` of its config while registered (``overrides``)."""

    def __init__(self):
        super().__init__()
        self._module = None

    def copy(self):
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__)
        Hook.__init__(copy)
        copy._module = None
        return copy

    def overrides(self, config):
        raise NotImplementedError

    def prepare(self, module):
        """Raise for modules this rule cannot take."""

    def register(self, module):
        config = getattr(module, 'config', None)
        if config is None:
            raise TypeError(f'{type(module).__name__} has no config; it is not a transformers module this rule takes')
        if isinstance(config, _ConfigView):
            raise RuntimeError(f'{type(module).__name__} already has an lxt_ext rule registered')
        self.prepare(module)
        self._module = module
        module.config = _ConfigView(config, self, **self.overrides(config))
        return RemovableHandleList([RemovableHandle(self)])

    def remove(self):
        super().remove()
        module, self._module = self._module, None
        if module is not None and isinstance(module.config, _ConfigView):
            module.config = module.config._lxt_ext_config


def _wants_relevance(hook, *tensors):
    """The same rule as SwappedForward: plain without a backward, or with the rule made inactive."""
    return hook.active and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _original_attention(module, config):
    """The attention function the module would use without lxt_ext."""
    eager = getattr(sys.modules[type(module).__module__], 'eager_attention_forward', None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager)


def _additive(mask, dtype):
    """An attention mask (bool: True = attend, or additive) as an additive one."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _attention(mode):
    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        """``(B, H, N, D)`` query, key, value -> ``((B, N, H, D) output, None)``, as transformers'
        sdpa_attention_forward, with the causal flag decided the same way."""
        view = module.config
        hook = view._lxt_ext_hook
        if not _wants_relevance(hook, query, key, value):
            return _original_attention(module, view._lxt_ext_config)(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                **kwargs)
        for unsupported in ('s_aux', 'sinks'):
            if kwargs.get(unsupported) is not None:
                raise NotImplementedError(
                    f'{type(module).__name__}: lxt_ext attention does not support {unsupported!r} (attention sinks) '
                    f'yet; map this module to another rule or leave it out of the composite')
        if kwargs.get('output_attentions'):
            raise NotImplementedError(
                f'{type(module).__name__}: output_attentions=True would need the N x N attention matrix, which '
                f'lxt_ext never forms; call the model without it')
        q_length, kv_length = query.shape[2], key.shape[2]
        causal = getattr(module, 'is_causal', True) if is_causal is None else is_causal
        causal = bool(q_length > 1 and attention_mask is None and causal)
        if causal and kv_length > q_length:
            # prefill of an empty static cache: the keys beyond the queries are masked anyway
            key, value = key[:, :, :q_length], value[:, :, :q_length]
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = attention_mask[:, :, :, :key.shape[2]]
        bias = kwargs.get('position_bias')
        if bias is not None:
            # T5's relative position bias: a function of the positions only, off the relevance path
            bias = bias.detach()[:, :, :, :key.shape[2]]
            mask = _additive(attention_mask, query.dtype)
            attention_mask = bias if mask is None else bias + mask
        if kwargs.get('softcap') is not None:
            output = softcapped_attention(query, key, value, attention_mask, scale=scaling, is_causal=causal,
                                          softcap=kwargs['softcap'], mode=mode,
                                          input_stabilizer=hook.input_stabilizer)
        else:
            output = attention_lrp(query, key, value, attention_mask, scale=scaling, is_causal=causal, mode=mode)
        return output.transpose(1, 2).contiguous(), None
    attention.__name__ = f'lxt_ext_{mode}_attention'
    return attention


for _mode, _name in _IMPLEMENTATIONS.items():
    AttentionInterface.register(_name, _attention(_mode))


class _UniformMatmul(torch.autograd.Function):
    """``a @ b``; backward the uniform rule: ``g_a = (g b^T) / 2``, ``g_b = (a^T g) / 2``."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    @first_order
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return (grad @ b.transpose(-2, -1)) / 2, (a.transpose(-2, -1) @ grad) / 2


class _SoftmaxRule(torch.autograd.Function):
    """``y = softmax(x)`` over the last dimension (in float32, as transformers' eager attention); backward
    AttnLRP's softmax rule ``R_in = x (R_out - y sum(R_out))``, which in the Gradient x Input convention
    (``R = t g_t``) is the softmax's own gradient: ``g_in = y (g_out - sum(y g_out))``."""

    @staticmethod
    def forward(ctx, x):
        y = torch.softmax(x, dim=-1, dtype=torch.float32)
        ctx.save_for_backward(y)
        ctx.dtype = x.dtype
        return y

    @staticmethod
    @first_order
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        grad = grad.float()
        return (y * (grad - (y * grad).sum(-1, keepdim=True))).to(ctx.dtype)


def softcapped_attention(query, key, value, attn_mask=None, *, scale=None, is_causal=False, softcap, mode='attnlrp',
                         input_stabilizer=1e-10):
    """``softmax(c tanh(scale Q K^T / c) + M) V`` (Gemma 2's attention softcap ``c``) with an LRP backward,
    eagerly (the N x N scores are formed and kept; the fused op has no softcap). AttnLRP: the uniform
    rule on both matrix products, the identity rule on the monotone softcap, the softmax rule (in the
    Gradient x Input convention, the softmax's plain gradient); CP-LRP: the attention weights constant.
    Shapes and masks as ``lxt_ext.attention.attention_lrp``."""
    if mode not in ATTENTION_MODES:
        raise ValueError(f'mode must be one of {tuple(ATTENTION_MODES)}, got {mode!r}')
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    matmul = _UniformMatmul.apply if mode == 'attnlrp' else torch.matmul
    scores = matmul(query, key.transpose(-2, -1)) * scale
    cap = float(softcap)
    scores = identity_rule(lambda s: torch.tanh(s / cap) * cap, scores, input_stabilizer)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float('-inf')) if attn_mask.dtype == torch.bool else scores + attn_mask
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(causal, float('-inf'))
    if mode == 'cp':
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        return weights.detach() @ value
    return matmul(_SoftmaxRule.apply(scores).to(query.dtype), value)


class HFAttention(_ConfigViewRule):
    """AttnLRP or CP-LRP on one transformers attention module (any module that dispatches through
    ``ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]``)."""

    def __init__(self, mode='attnlrp', input_stabilizer=1e-10):
        super().__init__()
        if mode not in _IMPLEMENTATIONS:
            raise ValueError(f"mode must be one of {sorted(_IMPLEMENTATIONS)}, got {mode!r}")
        self.mode = mode
        self.input_stabilizer = input_stabilizer

    def overrides(self, config):
        return {'_attn_implementation': _IMPLEMENTATIONS[self.mode]}


def _experts(mode):
    def experts(module, hidden_states, top_k_index, top_k_weights):
        """transformers 5's experts forward ``(tokens, hidden)`` -> ``(tokens, hidden)`` with each
        expert under the composite's rules and the routing weights as constants."""
        view = module.config
        hook = view._lxt_ext_hook
        if not _wants_relevance(hook, hidden_states):
            original = ALL_EXPERTS_FUNCTIONS.get_interface(view._lxt_ext_config._experts_implementation,
                                                           type(module).forward.__wrapped__)
            return original(module, hidden_states, top_k_index, top_k_weights)
        return _experts_lrp(module, hook, hidden_states, top_k_index, top_k_weights.detach())
    experts.__name__ = f'lxt_ext_{mode}_experts'
    return experts


def _expert_linear(module, rule, name, expert, x):
    """``x`` through expert ``expert``'s projection ``name`` (3-D parameter, optional ``name + '_bias'``)."""
    weight = getattr(module, name)[expert]
    bias = getattr(module, f'{name}_bias')[expert] if module.has_bias else None
    return linear_rule_apply(rule, x, weight.t() if module.is_transposed else weight, bias)


def _experts_lrp(module, hook, hidden_states, top_k_index, top_k_weights):
    """Token-expert pairs sorted by expert, each expert's MLP on its tokens, the outputs scaled by the
    (constant) routing weights and summed per token. Only linear operations join the pieces (index,
    cat, sum), so autograd carries relevance through them exactly."""
    tokens, k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=module.num_experts).tolist()
    pieces = []
    for expert, x in enumerate(hidden_states[order // k].split(counts)):
        if not counts[expert]:
            continue
        if module.has_gate:
            gate, up = _expert_linear(module, hook.linear, 'gate_up_proj', expert, x).chunk(2, dim=-1)
            h = gated_product(module.act_fn(gate), up, hook.mode)
        else:
            h = module.act_fn(_expert_linear(module, hook.linear, 'up_proj', expert, x))
        pieces.append(_expert_linear(module, hook.linear, 'down_proj', expert, h))
    weighted = torch.cat(pieces) * top_k_weights.reshape(-1)[order, None].to(hidden_states.dtype)
    return weighted[torch.argsort(order)].view(tokens, k, -1).sum(1).to(hidden_states.dtype)


if ExpertsInterface is not None:
    for _mode, _name in _IMPLEMENTATIONS.items():
        ExpertsInterface.register(_name, _experts(_mode))


class HFExperts(_ConfigViewRule):
    """A transformers 5 experts module (``@use_experts_implementation``: 3-D ``gate_up_proj``/``down_proj``,
    dispatched through ``ALL_EXPERTS_FUNCTIONS``): each expert's projections under the composite's
    Linear rule (``linear_rule``), its gated product under the gated-MLP rule of ``mode``, its
    activation module under its own rule; the routing weights are constants (see ``RouterConstant``).
    Custom gates (``_apply_gate`` overridden: GPT-OSS, ...), interleaved gate/up weights, post-expert
    norms and expert parallelism are refused by name."""

    def __init__(self, mode='attnlrp', linear_rule=None):
        super().__init__()
        if mode not in _IMPLEMENTATIONS:
            raise ValueError(f"mode must be one of {sorted(_IMPLEMENTATIONS)}, got {mode!r}")
        if linear_rule is None:
            raise ValueError('the experts rule needs the composite\'s Linear rule (Options.linear)')
        self.mode = mode
        self.linear = linear_rule

    def copy(self):
        copy = super().copy()
        copy.linear = self.linear.copy()
        return copy

    def prepare(self, module):
        cls = type(module)
        refused = [reason for reason, present in (
            ('its own _apply_gate (a custom gate)', getattr(cls, '_apply_gate', _default_apply_gate)
             is not _default_apply_gate),
            ('interleaved gate/up weights', module.has_gate and not module.is_concatenated),
            ('a post-expert norm', module.has_post_expert_norm),
            ('expert parallelism', module._is_expert_parallel)) if present]
        if refused:
            raise NotImplementedError(f'{cls.__module__}.{cls.__qualname__}: lxt_ext\'s experts rule does not cover '
                                      f'{", ".join(refused)}; leave this model out of the composite')

    def overrides(self, config):
        return {'_experts_implementation': _IMPLEMENTATIONS[self.mode]}


class DenseExperts(SwappedForward):
    """Llama 4's experts: every expert on every token, ``(E * T, H)`` inputs already scaled by the (constant)
    router scores; per expert ``down(up * act(gate))`` with ``gate, up = x @ gate_up_proj[e]`` (3-D
    parameters, ``(E, in, out)``): each projection under the composite's Linear rule, the product under
    the gated-MLP rule, the activation module under its own rule."""

    def __init__(self, mode='attnlrp', linear_rule=None):
        super().__init__()
        if linear_rule is None:
            raise ValueError('the experts rule needs the composite\'s Linear rule (Options.linear)')
        self.mode = mode
        self.linear = linear_rule

    def copy(self):
        copy = super().copy()
        copy.linear = self.linear.copy()
        return copy

    def apply(self, module, original, input, args, kwargs):
        experts = input.view(module.gate_up_proj.shape[0], -1, input.shape[-1])
        outputs = []
        for expert, x in enumerate(experts):
            gate, up = linear_rule_apply(self.linear, x, module.gate_up_proj[expert].t()).chunk(2, dim=-1)
            h = gated_product(module.act_fn(gate), up, self.mode)
            outputs.append(linear_rule_apply(self.linear, h, module.down_proj[expert].t()))
        return torch.stack(outputs).view(-1, input.shape[-1])


class RouterConstant(SwappedForward):
    """A mixture-of-experts router run without grad: its routing weights are constants for the
    experts' outputs they scale, so the router gets no relevance (see the module doc)."""
    checked = False  # its outputs carry no relevance

    def apply(self, module, original, input, args, kwargs):
        with torch.no_grad():
            return original(input, *args, **kwargs)


def gated_product(gate, up, mode):
    """``gate * up`` of a gated MLP (``gate`` the activation's output): AttnLRP's uniform rule (half
    of the relevance to each factor), or CP-LRP's gate held constant (all relevance through ``up``)."""
    return uniform_product(gate, up) if mode == 'attnlrp' else gate.detach() * up


class GatedMLP(SwappedForward):
    """``down(act(gate(x)) * up(x))`` (``names``: the attributes of gate, up, down and act; LLaMA's by
    default). AttnLRP: the uniform rule on the product (half of the relevance to each factor). CP-LRP
    (as LXT): the gate is held constant, all relevance goes through ``up``. The projections and the
    activation stay modules, so their own rules apply; a ``dropout`` module after the product is run
    (it is off under the composites)."""

    NAMES = ('gate_proj', 'up_proj', 'down_proj', 'act_fn')
    KIND = 'gated MLP'

    def __init__(self, mode='attnlrp', names=None):
        super().__init__()
        self.mode = mode
        self.names = tuple(self.NAMES if names is None else names)

    def prepare(self, module):
        missing = [name for name in self.names if not hasattr(module, name)]
        if missing:
            raise TypeError(f'{type(module).__name__} is not a {self.KIND}: it lacks {missing}')

    def factors(self, module, input):
        """``(act(gate), up, down)`` of ``input``."""
        gate, up, down, act = (getattr(module, name) for name in self.names)
        return act(gate(input)), up(input), down

    def apply(self, module, original, input, args, kwargs):
        if args or kwargs:
            raise TypeError(f'{type(module).__name__}: a gated MLP takes one input, got more')
        gate, up, down = self.factors(module, input)
        product = gated_product(gate, up, self.mode)
        dropout = getattr(module, 'drop', None) or getattr(module, 'dropout', None)
        if isinstance(dropout, torch.nn.Dropout):
            product = dropout(product)
        if down.weight.is_floating_point() and product.dtype != down.weight.dtype:
            product = product.to(down.weight.dtype)  # T5 keeps its output projection in float32
        output = down(product)
        # Model code may add to the MLP's output in place (Llama 4's MoE: out.add_): where down's rule keeps its
        # output for backward, return a fresh tensor (transient: the residual add keeps nothing)
        return output.clone() if getattr(rule_of(down), 'keeps_output', False) else output


class FusedGatedMLP(GatedMLP):
    """A gated MLP with one fused input projection: ``down(act(gate) * up)`` with
    ``gate, up = fused(x).chunk(2)`` (``names``: fused, down, act; Phi-3's and GLM's by default,
    ModernBERT's ``Wi``, ``Wo``, ``act``); otherwise ``GatedMLP``."""

    NAMES = ('gate_up_proj', 'down_proj', 'activation_fn')
    KIND = 'fused gated MLP'

    def factors(self, module, input):
        fused, down, act = (getattr(module, name) for name in self.names)
        gate, up = fused(input).chunk(2, dim=-1)
        return act(gate), up, down


class SharedExpertMoE(SwappedForward):
    """Qwen2-MoE's block: routed experts plus a shared expert scaled by ``sigmoid(shared_expert_gate(x))``.
    The shared expert's gate is held constant like the routing weights (see the module doc); the router,
    the experts and the shared expert run as modules under their own rules."""

    def apply(self, module, original, input, args, kwargs):
        batch, length, hidden = input.shape
        x = input.reshape(-1, hidden)
        shared = module.shared_expert(x)
        _, routing_weights, selected = module.gate(x)
        routed = module.experts(x, selected, routing_weights)
        with torch.no_grad():
            scale = torch.sigmoid(module.shared_expert_gate(x))
        return (routed + scale * shared).reshape(batch, length, hidden)


class TanhClassificationHead(SwappedForward):
    """RoBERTa's (XLM-RoBERTa's, CamemBERT's, Data2VecText's) classification head
    ``out_proj(tanh(dense(x[:, 0])))``, whose ``tanh`` is functional: the identity rule on it; ``dense``
    and ``out_proj`` under their own rules, dropout off."""

    def __init__(self, input_stabilizer=1e-10):
        super().__init__()
        self.input_stabilizer = input_stabilizer

    def apply(self, module, original, features, args, kwargs):
        x = module.dense(module.dropout(features[:, 0, :]))
        return module.out_proj(module.dropout(identity_rule(torch.tanh, x, self.input_stabilizer)))


class GeluLMHead(SwappedForward):
    """RoBERTa's (XLM-RoBERTa's, CamemBERT's, Data2VecText's) masked-LM head ``decoder(layer_norm(gelu(dense(x))))``,
    whose ``gelu`` is a module-level function of its modeling file: the identity rule on it; ``dense``,
    ``layer_norm`` and ``decoder`` under their own rules."""

    def __init__(self, input_stabilizer=1e-10):
        super().__init__()
        self.input_stabilizer = input_stabilizer

    def apply(self, module, original, features, args, kwargs):
        gelu = sys.modules[type(module).__module__].gelu
        x = identity_rule(gelu, module.dense(features), self.input_stabilizer)
        return module.decoder(module.layer_norm(x))


class FinalLogitSoftcap(_ConfigViewRule):
    """Gemma 2's (and Gemma 3's, when set) final-logit softcap ``c tanh(z / c)``, computed functionally
    in the model's forward: the identity rule on it (a monotone element-wise map: the relevance of
    each capped logit goes to the logit it was computed from). While registered the model computes
    uncapped logits (its config view has no softcap) and a forward hook caps them with the rule.
    A ``labels`` loss would then be of the uncapped logits: it is refused."""

    def __init__(self, input_stabilizer=1e-10):
        super().__init__()
        self.input_stabilizer = input_stabilizer

    def overrides(self, config):
        return {'final_logit_softcapping': None}

    def register(self, module):
        handles = super().register(module)
        cap = float(module.config._lxt_ext_config.final_logit_softcapping)
        hook = self

        def softcap(logits):  # transformers' own order of operations, so the forward is bitwise the same
            return torch.tanh(logits / cap) * cap

        def capped(module, args, output):
            if not hasattr(output, 'logits'):
                raise TypeError(f'{type(module).__name__}: lxt_ext\'s final-logit softcap rule needs return_dict=True')
            if output.get('loss') is not None:
                raise NotImplementedError(
                    f'{type(module).__name__}: while lxt_ext holds its final-logit softcap the loss would be of the '
                    f'uncapped logits; call the model without labels')
            logits = output.logits
            output.logits = (identity_rule(softcap, logits, hook.input_stabilizer)
                             if _wants_relevance(hook, logits) else softcap(logits))
            return output

        handles.append(module.register_forward_hook(capped))
        return handles


# Classes by name, so that supporting an architecture imports nothing. Attention modules of
# architectures not named here are found by _dispatches_attention below, experts modules by
# _dispatches_experts.
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
    'LaplaceActivation', 'XIELUActivation',
}
_ROUTERS = {'MixtralTopKRouter', 'Qwen3MoeTopKRouter', 'Llama4Router'}
_DENSE_EXPERTS = {'Llama4TextExperts'}
# RoBERTa-style heads with a functional tanh (classification) or gelu (masked LM)
_ROBERTA_LIKE = ('Roberta', 'XLMRoberta', 'Camembert', 'Data2VecText')
_TANH_HEADS = {f'{name}ClassificationHead' for name in _ROBERTA_LIKE}
_GELU_LM_HEADS = {f'{name}LMHead' for name in _ROBERTA_LIKE}
_FINAL_LOGIT_SOFTCAP = {'Gemma2ForCausalLM', 'Gemma3ForCausalLM'}
# Attention computed in the module's own forward (no registry), refused by name rather than left to the audit.
_REFUSED = {name: 'computes attention in its own forward (' + why + '), which lxt_ext does not cover yet'
            for name, why in (('GPTNeoSelfAttention', 'bmm and softmax'), ('BloomAttention', 'ALiBi, baddbmm'),
                              ('DisentangledSelfAttention', "DeBERTa's disentangled position terms"),
                              ('Data2VecVisionSelfAttention', 'matmul and softmax'),
                              ('Data2VecVisionSdpaSelfAttention', 'SDPA with a relative position bias'))}
# Off the relevance path (position tables; rotary embeddings, matched by suffix too) or linear in their
# relevance-carrying input (LayerScale: a product with a parameter; drop path: off in eval mode).
_KEEP_GRADIENT = {'LinearActivation', 'Gemma3TextScaledWordEmbedding', 'Dinov2LayerScale', 'Dinov2DropPath',
                  'Dinov2WithRegistersLayerScale', 'Dinov2WithRegistersDropPath'}


def _dispatches_attention(module):
    """Whether the module's forward goes through transformers' attention-function registry."""
    modeling = sys.modules.get(type(module).__module__)
    # the forward without its decorators (transformers wraps many in deprecate_kwarg)
    forward = inspect.unwrap(type(module).forward)
    return (hasattr(module, 'config') and getattr(modeling, 'ALL_ATTENTION_FUNCTIONS', None) is not None
            and type(module).__name__.endswith('Attention') and 'attention_interface' in forward.__code__.co_varnames)


def _probe(module, features, dtype=None):
    """A small random input for ``module`` (``features`` wide) on its parameters' device, in ``dtype``
    (default: its parameters' dtype)."""
    parameter = next(module.parameters(), None)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, features, generator=generator)
    return x if parameter is None else x.to(parameter.device, dtype or parameter.dtype)


def _tolerance(x):
    """allclose's (rtol, atol) for two computations of the same function in ``x``'s dtype."""
    return (1e-5, 1e-6) if x.dtype in (torch.float32, torch.float64) else (2e-2, 2e-2)


def _class_forward(module, x):
    """The module's class forward on ``x``, without its hooks or an instance-level forward."""
    return type(module).forward(module, x)


def _rms_norm_offset(module):
    """For an RMSNorm class no table names: the ``weight_offset`` (0: ``w * x * rstd``, LLaMA's; 1:
    ``(1 + w) * x * rstd``, Gemma's) whose formula gives the module's own output on a random probe, or
    None (then the module is left unmapped and reported). Checked numerically, so a norm of another
    form is never given the identity rule of a wrong one."""
    weight = getattr(module, 'weight', None)
    eps = next((getattr(module, n) for n in ('variance_epsilon', 'eps') if isinstance(getattr(module, n, None), float)),
               None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps is None:
        return None
    try:
        with torch.no_grad():
            x = _probe(module, weight.shape[0], torch.float32)
            output = _class_forward(module, x)
            normalised = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
            for offset in (0., 1.):
                if torch.allclose(output.float(), normalised * (offset + weight.float()), rtol=1e-4, atol=1e-5):
                    return offset
    except Exception:  # noqa: BLE001 (a module that cannot run on the probe is no match)
        return None
    return None


def _layer_norm_eps(module):
    """For a LayerNorm class no table names (Cohere's, OLMo's, ...): the epsilon with which
    ``F.layer_norm`` over the last dimension, with the module's ``weight`` and ``bias`` (either may be
    absent), gives its output on a random probe, or None (checked numerically, see ``_rms_norm_offset``)."""
    weight, bias = getattr(module, 'weight', None), getattr(module, 'bias', None)
    shape = tuple(getattr(module, 'normalized_shape', ())) or (tuple(weight.shape) if weight is not None else ())
    if len(shape) != 1 or any(t is not None and not isinstance(t, torch.Tensor) for t in (weight, bias)):
        return None
    own = [getattr(module, name) for name in ('eps', 'variance_epsilon')
           if isinstance(getattr(module, name, None), float)]
    try:
        with torch.no_grad():
            x = _probe(module, shape[0], torch.float32)
            output = _class_forward(module, x).float()
            for eps in own + [1e-5, 1e-6, 1e-12]:
                expected = torch.nn.functional.layer_norm(x.float(), shape, None if weight is None else weight.float(),
                                                          None if bias is None else bias.float(), eps)
                if torch.allclose(output, expected, rtol=1e-4, atol=1e-5):
                    return eps
    except Exception:  # noqa: BLE001
        return None
    return None


def _is_fused_gated_mlp(module):
    """For an MLP class no table names: whether it has Phi-3's ``gate_up_proj``/``down_proj``/``activation_fn``
    and computes ``down(act(gate) * up)`` with ``gate, up = gate_up_proj(x).chunk(2)`` (checked numerically)."""
    if not all(isinstance(getattr(module, name, None), torch.nn.Module) for name in FusedGatedMLP.NAMES):
        return False
    if not isinstance(module.gate_up_proj, torch.nn.Linear):
        return False
    try:
        with torch.no_grad():
            x = _probe(module, module.gate_up_proj.in_features)
            gate, up = module.gate_up_proj(x).chunk(2, dim=-1)
            expected = module.down_proj(module.activation_fn(gate) * up)
            rtol, atol = _tolerance(x)
            return torch.allclose(_class_forward(module, x), expected, rtol=rtol, atol=atol)
    except Exception:  # noqa: BLE001
        return False


def _is_gated_mlp(module):
    """For an MLP class no table names: whether it has LLaMA's ``gate_proj``/``up_proj``/``down_proj``/``act_fn``
    and computes ``down(act(gate(x)) * up(x))`` (checked numerically on a random probe)."""
    if not all(isinstance(getattr(module, name, None), torch.nn.Module) for name in GatedMLP.NAMES):
        return False
    if not isinstance(module.gate_proj, torch.nn.Linear):
        return False
    try:
        with torch.no_grad():
            x = _probe(module, module.gate_proj.in_features)
            expected = module.down_proj(module.act_fn(module.gate_proj(x)) * module.up_proj(x))
            rtol, atol = _tolerance(x)
            return torch.allclose(_class_forward(module, x), expected, rtol=rtol, atol=atol)
    except Exception:  # noqa: BLE001
        return False


def _dispatches_experts(module):
    """Whether the module is a transformers 5 experts module (``@use_experts_implementation``)."""
    return (ALL_EXPERTS_FUNCTIONS is not None and hasattr(module, 'config') and hasattr(module, 'has_gate')
            and hasattr(module, 'is_concatenated') and hasattr(type(module).forward, '__wrapped__'))


@matcher
def transformers_rule(module, options):
    cls = type(module)
    if not cls.__module__.startswith('transformers.'):
        return None
    name = cls.__name__
    if name in _ATTENTION or (name not in _GATED_MLP and _dispatches_attention(module)):
        return HFAttention(options.attention, options.input_stabilizer)
    if _dispatches_experts(module):
        return HFExperts(options.attention, None if options.linear is None else options.linear.copy())
    if name in _DENSE_EXPERTS:
        return DenseExperts(options.attention, None if options.linear is None else options.linear.copy())
    if name in _REFUSED:
        return Refused(_REFUSED[name])
    if name in _ROUTERS or (name.endswith(('TopKRouter', 'TopkRouter'))
                            and isinstance(getattr(module, 'weight', None), torch.Tensor)):
        return RouterConstant()
    if name in _GATED_MLP:
        return GatedMLP(options.attention, _GATED_MLP[name])
    if name.endswith('MLP') and _is_gated_mlp(module):
        return GatedMLP(options.attention)
    if name in _FUSED_GATED_MLP:
        return FusedGatedMLP(options.attention, _FUSED_GATED_MLP[name])
    if name.endswith('MLP') and _is_fused_gated_mlp(module):
        return FusedGatedMLP(options.attention)
    if name in _SHARED_EXPERT_MOE:
        return SharedExpertMoE()
    if name in _RMS_NORM:
        return NormIdentity(kind='rms_norm', weight_offset=_RMS_NORM[name])
    if name.endswith('RMSNorm'):
        offset = _rms_norm_offset(module)
        if offset is not None:
            return NormIdentity(kind='rms_norm', weight_offset=offset)
    if name.endswith('LayerNorm') and not isinstance(module, torch.nn.LayerNorm):
        eps = _layer_norm_eps(module)
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


class Conv1DRule(SwappedForward):
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` of shape (in, out), i.e. a Linear
    layer with weight ``W^T``, under the composite's Linear rule."""

    def __init__(self, linear_rule):
        super().__init__()
        self.linear_rule = linear_rule

    def apply(self, module, original, input, args, kwargs):
        return linear_rule_apply(self.linear_rule, input, module.weight.t(), module.bias)
