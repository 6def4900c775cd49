"""Rules at the level of operations: while a transformer composite is registered, every torch operation on the
relevance path that no module rule covers gets its rule, or a refusal naming it before any relevance is returned.

``OperationRules`` (registered by ``lxt_ext.composites.TransformerComposite`` on the model it explains) runs the
model's forward under a ``TorchFunctionMode``, which sees every ``torch.*``, ``torch.nn.functional.*`` and Tensor
method or operator call made in Python. Inside a module whose rule computes it (the module tables of
``lxt_ext.models``: fused attention, gated MLPs, norms, Linear layers, ...) every call passes unchanged; elsewhere
a call with a *relevance-carrying* input (one that requires grad and derives from the model's inputs, not from
parameters alone) gets, by the operation's name (Gradient x Input convention, ``lxt_ext.transformer``):

- linear operations (views, reshapes, adds, concatenation, indexing, sums, scaling by a constant; ``LINEAR``):
  the plain gradient, which is exact for them;
- positively homogeneous maps (``relu``, max pooling, ``max``/``topk`` values: ``f(x) = f'(x) x``) and the
  softmax (AttnLRP's softmax rule is its plain gradient in this convention): the plain gradient;
- element-wise non-linear maps (GELU, SiLU, sigmoid, tanh and softcaps, softplus, ``exp``, ``clamp``, ...;
  ``ELEMENTWISE``): the identity rule ``g_in = g_out f(x) / stab(x)``; a map whose value at 0 is not 0 (sigmoid,
  softplus, ``exp``; ``_OFFSET_MAPS``) would pass its offset's relevance on that way, so its output is a gate held
  constant in every product (AttnLRP's too) and refused where relevance passes it otherwise;
- a product of two relevance-carrying tensors (element-wise or matrix products, ``einsum``, a ``linear`` with a
  carrying weight): AttnLRP's uniform rule (half of the plain gradient to each factor); under CP-LRP a factor
  that is a *gate* (the output of a softmax, a sigmoid or another activation, a view, sum or normalisation of
  one, or a module's output computed from gates alone) is held constant, as the attention weights and a gated
  MLP's gate are (of two gates the one made last); ``x * g(x)`` with ``g`` element-wise from ``x`` alone (SiLU
  written out) holds ``g`` constant in both modes;
- ``F.linear`` (and a matrix product with a 2-D right factor) of a carrying input: the composite's Linear rule;
- layer, RMS and group norms, ``F.normalize``: the identity rule on the normalisation (statistics constant);
  batch norm in eval mode is linear. Norms written out (``x * rsqrt(mean(x ** 2) + eps)``, ``(x - u) / sqrt(var +
  eps)``, ``x / x.norm()``) get the same rule: a *statistic* (``var``, ``std``, ``norm``, or ``mean``/``sum`` of a
  square) and what is computed from it alone (adding constants, ``rsqrt``, ``sqrt``, powers, casts, views) is held
  constant where it scales or divides a carrying tensor; a square or a statistic used any other way is refused;
- ``F.scaled_dot_product_attention``: ``lxt_ext.attention.attention_lrp`` with the composite's attention rule;
- anything else whose output requires grad: ``UncoveredOperationError`` naming the operation, the module and the
  source line (a warning with ``strict=False``).

A division by a carrying tensor, a power, a logarithm, a square root and every operation not named here are
refused. The mode cannot see inside an autograd Function another library applies (``Function.apply``), only the
operations its forward runs without grad: ``lxt_ext.diagnostics.audit`` names those.
"""
import os
import sys
import warnings

import torch
from torch.overrides import TorchFunctionMode

from ._docstrings import shared_parameters
from .attention import attention_lrp, eager_attention, uniform_matmul
from .core import KeepGradient, RuleHook, rule_of
from .errors import UncoveredOperationError
from .ops import attention_mode
from .transformer.convention import ExplicitRelevance, linear_rule_apply
from .transformer.convolution import CONVOLUTIONS, convolution_arguments
from .transformer.elementwise import INPUT_STABILIZER, ActivationIdentity, identity_rule, uniform_product
from .transformer.norms import functional_rms_norm_identity, group_norm_identity, layer_norm_identity

__all__ = ['OperationRules', 'emits_relevance', 'alias', 'tensors_in', 'LINEAR', 'HOMOGENEOUS',
           'ELEMENTWISE', 'PRODUCTS', 'MATRIX_PRODUCTS', 'DIVISIONS', 'covers_operations']

# Linear in every relevance-carrying input: the plain gradient is exact (an allow-list: a name missing here is
# refused, never passed).
LINEAR = frozenset({
    # views, copies and casts
    'view', 'view_as', 'reshape', 'reshape_as', 'flatten', 'unflatten', 'squeeze', 'unsqueeze', 'transpose', 't',
    'permute', 'movedim', 'moveaxis', 'swapaxes', 'swapdims', 'expand', 'expand_as', 'broadcast_to', 'contiguous',
    'clone', 'to', 'float', 'double', 'half', 'bfloat16', 'type', 'type_as', 'cpu', 'cuda', 'as_strided',
    'view_as_real', 'view_as_complex', 'conj', 'resolve_conj', 'resolve_neg', 'requires_grad_', 'detach',
    # selections and rearrangements
    'narrow', 'select', '__getitem__', '__setitem__', 'index_select', 'gather', 'take_along_dim', 'split',
    'split_with_sizes', 'chunk', 'tensor_split', 'unbind', 'cat', 'concat', 'concatenate', 'stack', 'hstack',
    'vstack', 'repeat', 'repeat_interleave', 'tile', 'roll', 'flip', 'fliplr', 'flipud', 'pad', 'constant_pad_nd',
    'tril', 'triu', 'diagonal', 'diag_embed', 'unfold', 'fold', 'pixel_shuffle', 'pixel_unshuffle',
    'channel_shuffle', 'masked_fill', 'masked_fill_', 'where', 'index_put', 'index_put_', 'index_copy',
    'index_copy_', 'index_add', 'index_add_', 'index_fill', 'index_fill_', 'masked_scatter', 'masked_scatter_',
    'scatter', 'scatter_', 'scatter_add', 'scatter_add_', 'copy_', 'fill_', 'zero_', 'nan_to_num',
    # sums, differences, scaling by constants, averages, interpolation
    'add', 'add_', '__radd__', '__iadd__', 'sub', 'sub_', '__rsub__', '__isub__', 'subtract', 'neg', 'negative',
    '__neg__', '__pos__', 'positive', 'sum', 'mean', 'nansum', 'cumsum', 'diff', 'trace', 'avg_pool1d',
    'avg_pool2d', 'avg_pool3d', 'adaptive_avg_pool1d', 'adaptive_avg_pool2d', 'adaptive_avg_pool3d',
    'interpolate', 'upsample', 'upsample_nearest', 'upsample_bilinear',
    # dropout: off in eval mode, a constant random scaling in training
    'dropout', 'dropout1d', 'dropout2d', 'dropout3d', 'alpha_dropout', 'feature_alpha_dropout', 'native_dropout',
})
# Positively homogeneous (f(x) = f'(x) x) or selections of the largest: the plain gradient is the identity rule.
HOMOGENEOUS = frozenset({
    'relu', 'relu_', 'leaky_relu', 'leaky_relu_', 'prelu', 'max_pool1d', 'max_pool2d', 'max_pool3d',
    'max_pool1d_with_indices', 'max_pool2d_with_indices', 'max_pool3d_with_indices', 'adaptive_max_pool1d',
    'adaptive_max_pool2d', 'adaptive_max_pool3d', 'max', 'min', 'amax', 'amin', 'topk', 'sort', 'kthvalue',
    'median', 'cummax', 'cummin',
})
# Element-wise non-linear maps: the identity rule (in-place forms are computed out of place, then copied).
ELEMENTWISE = frozenset({
    'gelu', 'silu', 'sigmoid', 'tanh', 'softplus', 'elu', 'selu', 'celu', 'mish', 'hardswish', 'hardsigmoid',
    'hardtanh', 'relu6', 'logsigmoid', 'softsign', 'erf', 'exp', 'clamp', 'clip', 'clamp_min', 'clamp_max',
    'sigmoid_', 'tanh_', 'exp_', 'clamp_', 'clip_', 'clamp_min_', 'clamp_max_', 'elu_', 'selu_', 'celu_',
    'hardtanh_', 'erf_', 'gelu_', 'silu_', 'mish_', 'hardswish_', 'hardsigmoid_',
})
# Element-wise maps whose value at 0 is not 0 (sigmoid(0) = 1/2): the identity rule on them, R_in = R_out, would
# give the input the relevance of that offset too (through f(x) / x, exploding where x is near 0). Their outputs are
# gates held constant in every product, AttnLRP's too; relevance passing them otherwise is refused.
_OFFSET_MAPS = frozenset({'sigmoid', 'sigmoid_', 'hardsigmoid', 'hardsigmoid_', 'softplus', 'logsigmoid', 'exp',
                          'exp_'})
_OFFSET_MODULES = (torch.nn.Sigmoid, torch.nn.Hardsigmoid, torch.nn.Softplus, torch.nn.LogSigmoid)
_OFFSET = ('relevance passes an element-wise map whose value at 0 is not 0 (not only as a gate held constant in a '
           'product): the identity rule would give its input the relevance of that offset')
# Element-wise products, and matrix products / contractions (bilinear in their two tensor factors).
PRODUCTS = frozenset({'mul', 'multiply', 'mul_', '__mul__', '__rmul__', '__imul__'})
MATRIX_PRODUCTS = frozenset({
    'matmul', '__matmul__', '__rmatmul__', 'mm', 'bmm', 'mv', 'dot', 'vdot', 'inner', 'outer', 'ger', 'einsum',
    'tensordot', 'baddbmm', 'addbmm', 'addmm', 'addmv',
})
DIVISIONS = frozenset({'div', 'divide', 'true_divide', 'div_', '__truediv__', '__rtruediv__', '__rdiv__', '__idiv__',
                       '__itruediv__'})
# Operations that add (or place) their inputs into their output: a tensor cut off the relevance path loses its
# relevance there.
_ADDITIVE = frozenset({
    'add', 'add_', '__radd__', '__iadd__', 'sub', 'sub_', '__rsub__', '__isub__', 'subtract', 'cat', 'concat',
    'concatenate', 'stack', 'hstack', 'vstack', 'where', 'index_put', 'index_put_', 'index_add', 'index_add_',
    'scatter', 'scatter_', 'scatter_add', 'scatter_add_', 'masked_scatter', 'masked_scatter_', 'copy_', '__setitem__',
    'lerp', 'addcmul', 'addcdiv',
})
# Linear operations that keep a gate a gate when applied to it alone (a constant added, a sign flipped).
_SHIFTS = frozenset({'add', 'add_', '__radd__', '__iadd__', 'sub', 'sub_', '__rsub__', '__isub__', 'neg', '__neg__'})
_SOFTMAX = frozenset({'softmax', '_softmax'})
_EMBEDDING = frozenset({'embedding', 'embedding_bag'})
# Operations whose output is still a gate when their carrying input is one (views and casts of a softmax's output).
_KEEP_GATE = frozenset({
    'view', 'view_as', 'reshape', 'reshape_as', 'flatten', 'unflatten', 'squeeze', 'unsqueeze', 'transpose', 't',
    'permute', 'movedim', 'expand', 'expand_as', 'contiguous', 'clone', 'to', 'float', 'double', 'half', 'bfloat16',
    'type', 'type_as', 'narrow', 'select', '__getitem__', 'split', 'chunk', 'unbind', 'repeat', 'repeat_interleave',
    'masked_fill', 'where', 'dropout', 'native_dropout', 'tril', 'triu', 'gather', 'index_select', 'take_along_dim',
    'sum', 'mean', 'nansum', 'cat', 'concat', 'concatenate', 'stack',
})
# Linear operations that map each element of their input to one element of their output, in place (views, casts,
# a constant added, a scaling): x * g(x) computed through them is still an element-wise function of x.
_SAME_ELEMENTS = frozenset({
    'view', 'view_as', 'reshape', 'reshape_as', 'flatten', 'unflatten', 'squeeze', 'unsqueeze', 'transpose', 't',
    'permute', 'movedim', 'moveaxis', 'swapaxes', 'swapdims', 'expand', 'expand_as', 'broadcast_to', 'contiguous',
    'clone', 'to', 'float', 'double', 'half', 'bfloat16', 'type', 'type_as', 'neg', 'negative', '__neg__', '__pos__',
    'positive', 'dropout', 'native_dropout',
}) | _SHIFTS
# Linear operations whose second tensor is a template (its shape or dtype), not an operand.
_TEMPLATES = frozenset({'expand_as', 'view_as', 'reshape_as', 'type_as'})
# Element-wise maps without a rule (refused where relevance passes them), whose outputs keep their input's root.
_ELEMENTWISE_UNRULED = frozenset({'pow', '__pow__', 'float_power', 'reciprocal', 'sqrt', 'rsqrt', 'log', 'log1p',
                                  'cos', 'sin', 'abs', 'sign'})
# Normalisation statistics of a carrying tensor, and what keeps a statistic one (its input the statistic alone).
_STATISTICS = frozenset({'var', 'std', 'var_mean', 'std_mean', 'norm', 'vector_norm'})
_REDUCTIONS = frozenset({'mean', 'sum', 'nanmean', 'nansum'})
_KEEP_STATISTIC = frozenset({
    'add', 'add_', '__radd__', '__iadd__', 'sub', '__rsub__', 'rsqrt', 'rsqrt_', 'sqrt', 'sqrt_', 'reciprocal',
    'reciprocal_', 'pow', 'clamp', 'clamp_min', 'clamp_max', 'clamp_', 'clamp_min_', 'to', 'float', 'double', 'half',
    'bfloat16', 'type_as', 'expand', 'expand_as', 'view', 'reshape', 'unsqueeze', 'squeeze', '__getitem__',
    'contiguous', 'mul', 'div', 'true_divide', '__truediv__', '__rtruediv__', '__rdiv__', 'abs',
})
_RAW = ("the input goes into this operation (or module) besides the first layer, whose rule emits the input's "
        "relevance: the gradient arriving at the input would mix relevance and gradients (a model with more than one "
        "first layer, such as CrossViT's two patch embeddings, needs a composite without an explicit first layer)")
_TRUSTED_FUNCTIONS = ('lxt_ext.', 'torch._functorch.')
_CHECKPOINT = ("reentrant activation checkpointing, which re-runs the forward in backward, outside the operation "
               "rules; enable it as non-reentrant, e.g. for transformers model.activation_checkpointing_enable("
               "{'use_reentrant': False})")
# Operations that move, copy or cast elements without combining them: explicit relevance (what a first layer emits)
# passes them as the gradient does.
_ELEMENT_PRESERVING = frozenset({
    'view', 'view_as', 'reshape', 'reshape_as', 'flatten', 'unflatten', 'squeeze', 'unsqueeze', 'transpose', 't',
    'permute', 'movedim', 'contiguous', 'clone', 'to', 'float', 'double', 'half', 'bfloat16', 'type', 'type_as',
    '__getitem__', 'narrow', 'select', 'split', 'chunk', 'unbind', 'requires_grad_',
})
_SDPA_ARGUMENTS = ('query', 'key', 'value', 'attn_mask', 'dropout_p', 'is_causal', 'scale', 'enable_gqa')
_SKIPPED = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.abspath(__file__)) + os.sep)


@shared_parameters('any_module')
def covers_operations(module):
    """Whether a rule registered on ``module`` computes the module's operations (so the operation rules leave
    them alone): every lxt_ext rule but those that only wrap a forward (``covers_operations = False``).

    Returns
    -------
    bool
    """
    rule = rule_of(module)
    return rule is not None and rule.covers_operations


@shared_parameters('any_module')
def emits_relevance(module):
    """Whether the rule registered on ``module`` emits explicit relevance (a transformer composite's first layer).

    Returns
    -------
    bool
    """
    rule = rule_of(module)
    return isinstance(rule, ExplicitRelevance) or bool(getattr(rule, 'explicit_output', False))


def _name(func):
    # an OpOverload (torch.ops.aten.mul.Tensor) by its op's name; no str methods (torch.compile traces this)
    return getattr(func, '_opname', None) or getattr(func, '__name__', '')


def _flat(values):
    """The tensors among ``values`` (one level of lists and tuples looked into)."""
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (item for item in value if isinstance(item, torch.Tensor))


def _same(values, tensors):
    """Whether the sequences ``values`` and ``tensors`` hold the same objects (by identity: ``==`` on tensors
    compares elements)."""
    return len(values) == len(tensors) and all(value is tensor for value, tensor in zip(values, tensors))


_IN_PLACE = frozenset({'__iadd__', '__isub__', '__imul__', '__itruediv__', '__idiv__', '__setitem__', '__ipow__'})


def _keep_output_copy(target):
    """Model code is about to change ``target`` in place. Where a rule's autograd Function keeps that tensor (or
    the tensor it views) for its backward (``keeps_output``: OutputEpsilon), the Function's node gets a copy of it
    first (``output_copy``), which its backward reads: the change then neither breaks the backward (autograd's
    version check) nor alters the output the rule saw."""
    if not isinstance(target, torch.Tensor) or torch.compiler.is_compiling():
        return
    base = target._base if target._is_view() else target
    node = base.grad_fn
    if getattr(getattr(node, '_forward_cls', None), 'keeps_output', False) and not hasattr(node, 'output_copy'):
        node.output_copy = base.detach().clone()


def tensors_in(value):
    """The tensors in a forward's (nested) output: tensors, tuples and lists, dicts (transformers' ModelOutput).

    Parameters
    ----------
    value : object
        A tensor, or tuples, lists and dicts of them (and of other objects, ignored).

    Returns
    -------
    list of torch.Tensor
    """
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in tensors_in(item)]
    return []


def _swap(values, old, new):
    """``values`` (a tuple or dict of call arguments) with the tensor ``old`` replaced by ``new`` (by identity)."""
    def one(value):
        if value is old:
            return new
        if isinstance(value, (list, tuple)) and any(item is old for item in value):
            return type(value)(new if item is old else item for item in value)
        return value
    if isinstance(values, dict):
        return {key: one(value) for key, value in values.items()}
    return tuple(one(value) for value in values)


_ACTIVE = []  # the modes of the forwards running now (innermost last)


def alias(new, old):
    """Tell the operation rules of the forwards running now that ``new`` stands for ``old`` (an identity an autograd
    Function made, such as a diagnostic tap on a module's output), so that what they know of ``old`` (a gate, a
    statistic, computed from parameters alone, ...) holds for ``new``.

    Parameters
    ----------
    new, old : torch.Tensor
        The stand-in and the tensor it stands for.

    Returns
    -------
    torch.Tensor
        ``new``.
    """
    for mode in _ACTIVE:
        for kind in (mode.derived, mode.gates, mode.offsets, mode.statistics, mode.squares, mode.cut, mode.raw):
            if old in kind:
                kind[new] = kind[old]
        mode.roots[new] = mode.roots.get(old, old)
    return new


class _ScaledChannels(torch.autograd.Function):
    """``forward(x)`` (a batch norm in eval mode, computed as torch computes it); backward ``g * scale`` along the
    channels (dimension 1). Written out because torch's CPU batch-norm backward (2.14) returns wrong gradients for
    some output-gradient layouts (strides (32, 1, 64, 32) on a (1, 32, 2, 2) input: CvT's value projection)."""

    @staticmethod
    def forward(ctx, x, scale, forward):
        ctx.save_for_backward(scale)
        ctx.dims = x.dim()
        return forward(x)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale.view(-1, *(1,) * (ctx.dims - 2)).to(grad.dtype), None, None


class _Scope:
    """How deep the running forward is inside modules whose rules cover their operations (module hooks count)."""

    def __init__(self):
        self.depth = 0
        self.mode = None  # the mode of the forward running now
        self.cut = []  # per covered module entered from outside: whether a tensor cut off the relevance path went in

    def enter(self, module, args):
        if self.depth == 0 and self.mode is not None:
            self.mode.inspect(args)  # what enters a covered module from outside: made by another library's Function?
            mode = self.mode
            cut = bool(mode.cut) and not any(mode.carries(t) for t in _flat(args)) \
                and any(mode.is_cut(t) for t in _flat(args))
            # the input, whose relevance the first layer emits, going into another module
            raw = bool(mode.raw) and not emits_relevance(module) and any(t in mode.raw for t in _flat(args))
            carrying = [t for t in _flat(args) if mode.carries(t)]
            gated = bool(carrying) and all(t in mode.gates for t in carrying)
            # the mode is off inside (it would pass every call there): no Python call per operation of the module
            off = not torch.compiler.is_compiling() and torch._C._len_torch_function_stack() > 0 \
                and torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1) is mode
            if off:
                torch._C._pop_torch_function_stack()
            self.cut.append((cut, raw, gated, off))
        self.depth += 1

    def leave(self, module, args, output):
        self.depth -= 1
        if self.depth == 0 and self.mode is not None and self.cut:
            cut, raw, gated, off = self.cut.pop()
            if off:
                torch._C._push_on_torch_function_stack(self.mode)
            if cut:
                self.mode._cut(output)  # computed from cut tensors alone: cut too
            if raw:
                self.mode.refuse(type(module).__qualname__, _RAW, output)
            if isinstance(module, _OFFSET_MODULES) and isinstance(rule_of(module), ActivationIdentity):
                self.mode.offset(type(module).__name__, output)
            if gated or isinstance(rule_of(module), ActivationIdentity):
                # an activation module's output is a gate, as F.silu's is; so is what a module computes from gates
                # alone (Gemma 3n's AltUp coefficients: a Linear layer over a tanh router)
                self.mode._gate(output)


class _OperationMode(TorchFunctionMode):
    """The mode of one forward (see the module doc); ``derived`` and ``gates`` hold what it learnt of the
    tensors it made (tensors computed from parameters alone; gates for CP-LRP) until the forward ends."""

    def __init__(self, hook, root):
        super().__init__()
        self.hook, self.root, self.scope = hook, root, hook.scope
        self.derived, self.gates, self.statistics, self.squares, self.cut = {}, {}, {}, {}, {}
        self.gate_count, self.offsets = 0, {}
        self.sums = {}  # a sum or mean over a carrying tensor -> that tensor (a normaliser where it divides it)
        self.pending, self.names, self.foreign = [], None, set()
        self.raw = {}  # with a first layer that emits relevance: the input and its element-preserving views
        self.roots = {}  # a tensor computed element-wise from one carrying tensor alone -> that tensor

    def __enter__(self):
        self.scope.mode = self
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        self.scope.mode = None
        if _ACTIVE and _ACTIVE[-1] is self:
            _ACTIVE.pop()
        self.derived, self.gates, self.statistics, self.squares, self.cut = {}, {}, {}, {}, {}
        self.pending, self.foreign, self.raw, self.roots, self.offsets, self.sums = [], set(), {}, {}, {}, {}
        return super().__exit__(*exc)

    def inspect(self, values):
        """Note the carrying tensors among ``values`` that an autograd Function of another library made: the mode
        cannot see inside ``Function.apply``, so its backward is no rule (refused by ``settle`` if the output
        depends on it). Not under ``torch.compile``, which keeps no graph to look at."""
        if torch.compiler.is_compiling():
            return
        for tensor in _flat(values):
            node = tensor.grad_fn if self.carries(tensor) else None
            cls = getattr(node, '_forward_cls', None)
            # torch.compile's graphs are traced through this mode, so their rules are in them
            if cls is not None and node not in self.foreign and not cls.__module__.startswith(_TRUSTED_FUNCTIONS):
                self.foreign.add(node)
                name = f'{cls.__module__}.{cls.__qualname__}'
                self._note(f'{name}.apply', _CHECKPOINT if name == 'torch.utils.checkpoint.CheckpointFunction' else
                           'an autograd Function of another library, whose backward is no rule (the operation '
                           'rules cannot see inside it); its output is used here', [node])

    def carries(self, value):
        return (isinstance(value, torch.Tensor) and value.requires_grad and not isinstance(value, torch.nn.Parameter)
                and value not in self.derived)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.scope.depth:
            return func(*args, **kwargs)
        if not torch.is_grad_enabled():
            # model code computing from the input without grad (torch.no_grad): the result is cut off the relevance
            # path, which is right where it scales (a constant factor), and loses relevance where it is added
            output = func(*args, **kwargs)
            if any(self.carries(t) or self.is_cut(t) for t in _flat((*args, *kwargs.values()))):
                self._cut(output)
            return output
        carrying = [t for t in _flat(args) if self.carries(t)] + [t for t in _flat(kwargs.values()) if self.carries(t)]
        if carrying:
            self.inspect(carrying)
        name = _name(func)
        if name in _IN_PLACE or (name[-1:] == '_' and name[:1] != '_'):
            _keep_output_copy(args[0] if args else None)
        cut = self.cut and any(self.is_cut(t) for t in _flat((*args, *kwargs.values())))
        if not carrying:
            output = func(*args, **kwargs)
            if cut:
                self._cut(output)
            if name not in _EMBEDDING:  # an embedding's output starts the relevance path
                # computed from parameters (and tensors cut off the relevance path) alone: no relevance carrier
                for tensor in _flat((output,)):
                    if tensor.requires_grad:
                        self.derived[tensor] = True
            return output
        if self.raw and any(t in self.raw for t in carrying):
            output = func(*args, **kwargs)
            if name in _ELEMENT_PRESERVING and len(carrying) == 1:
                for tensor in _flat((output,)):
                    self.raw[tensor] = True
                return output
            return self.refuse(name, _RAW, output)
        if cut and name in _ADDITIVE:
            return self.refuse(name, 'a tensor computed from the input without grad (torch.no_grad or detach) is '
                                     'added to the relevance path here, so the relevance through it is lost',
                               func(*args, **kwargs))
        if name == 'detach':
            return self._cut(func(*args, **kwargs))
        if self.statistics or self.squares:
            if any(t in self.statistics or t in self.squares for t in carrying):
                return self.statistic(func, name, args, kwargs, carrying)
        squared = (name == 'pow' and len(args) == 2 and args[0] is carrying[0] and isinstance(args[1], (int, float))
                   and args[1] == 2) or (name == 'square' and len(carrying) == 1) \
            or (name in PRODUCTS and len(args) == 2 and args[0] is args[1])
        if name in _STATISTICS or squared:
            output = func(*args, **kwargs)
            for tensor in _flat((output,)):
                if name in ('var_mean', 'std_mean') and tensor is not output[0]:
                    continue  # the mean: linear
                (self.statistics if name in _STATISTICS else self.squares)[tensor] = True
            # refused if the output depends on it other than through a normalisation (which holds it constant)
            return self.refuse(name, 'a statistic or square of a relevance-carrying tensor used otherwise than to '
                                     'normalise it', output, defer=True)
        if name in LINEAR:
            output = func(*args, **kwargs)
            if name in _TEMPLATES and args:
                carrying = [t for t in carrying if t is args[0]]  # the other tensor gives a shape or a dtype only
            if len(carrying) == 1:
                self._derive(output, carrying[0], name in _KEEP_GATE or name in _SHIFTS, name in _SAME_ELEMENTS)
                if name in ('sum', 'mean') or (name in _SAME_ELEMENTS and carrying[0] in self.sums):
                    for tensor in _flat((output,)):
                        self.sums[tensor] = self.sums.get(carrying[0], carrying[0])
            elif name in _KEEP_GATE and all(t in self.gates for t in carrying):
                self._gate(output)
            elif name in _SHIFTS and len({id(self.roots.get(t, t)) for t in carrying}) == 1:
                # a sum of element-wise functions of one tensor is one too (GELU's tanh form: x + 0.044715 x^3)
                self.roots[output] = self.roots.get(carrying[0], carrying[0])
            return output
        if name in HOMOGENEOUS or name in _SOFTMAX:
            return self._gate(func(*args, **kwargs))
        rule = _RULES.get(name)
        if rule is None:
            for names, handler in _GROUPS:
                if name in names:
                    rule = handler
                    break
        if rule is not None:
            output = rule(self, func, name, args, kwargs, carrying)
            if output is not NotImplemented:
                if all(t in self.gates for t in carrying):
                    self._gate(output)  # computed from gates alone: a gate (as a module's output, see _Scope)
                return output
        output = func(*args, **kwargs)
        if name in _ELEMENTWISE_UNRULED and len(carrying) == 1 and args and args[0] is carrying[0]:
            self._derive(output, carrying[0], False)  # an element-wise map: x * g(x) through it is still one
        return self.refuse(name, 'an operation no rule covers', output)

    def is_cut(self, tensor):
        """Whether ``tensor`` was computed from the input without grad. (What an autograd Function's forward makes
        without grad is its output, which requires grad once ``apply`` returns: not cut.)"""
        return tensor in self.cut and not tensor.requires_grad

    def _cut(self, output):
        for tensor in _flat((output,)):
            if tensor.is_floating_point() or tensor.is_complex():  # not masks, indices or counts
                self.cut[tensor] = True
        return output

    def _derive(self, output, source, keeps_gate, keeps_root=True):
        """``output`` was computed from the one carrying tensor ``source`` (and constants): it has ``source``'s root
        where the operation maps each element to its own (``keeps_root``: views, casts, element-wise maps, a
        constant added or a scaling; not selections such as a split, whose pieces are other elements), and is a
        gate where ``source`` is one and the operation keeps that."""
        root = self.roots.get(source, source)
        for tensor in _flat((output,)):
            if keeps_root:
                self.roots[tensor] = root
            if keeps_gate and source in self.gates:
                self.gates[tensor] = self.gates[source]
                if source in self.offsets:
                    self.offsets[tensor] = True
        return output

    def _gate(self, output):
        """Mark ``output`` a gate; gates are numbered in the order they are made (see ``_gate_of``)."""
        for tensor in _flat((output,)):
            self.gate_count += 1
            self.gates[tensor] = self.gate_count
        return output

    def refuse(self, operation, reason, output, defer=False):
        """``output`` of an uncovered ``operation``: noted with the operation, the module running it and the source
        line, and refused (``settle``) if the forward's output depends on it through the relevance path (model
        code may hold it constant later: a router's weights, a norm's statistic); under ``torch.compile``, which
        keeps no graph to look at, refused at once (``defer``: not at all)."""
        compiling = torch.compiler.is_compiling()
        if compiling and defer:
            return output
        nodes = [t.grad_fn for t in _flat((output,)) if t.requires_grad and t.grad_fn is not None] \
            if not compiling else []
        if nodes or any(t.requires_grad for t in _flat((output,))):
            self._note(operation, reason, nodes)
        return output

    def _note(self, operation, reason, nodes):
        """A refusal of ``operation`` in the module running now, pending on ``nodes`` (none: at once)."""
        module, source = self._where()
        message = (f'{operation} in {module} at {source}: {reason}, so its plain gradient would propagate wrong '
                   f'relevance. Give the module a rule (layer_map=[(type, rule)] or an adapter in lxt_ext.models), '
                   f'or leave this model out of the composite.')
        if nodes:
            self.pending.append((message, nodes))
        else:
            self._raise([message])

    def settle(self, output):
        """Refuse the uncovered operations the forward's ``output`` depends on (see ``refuse``)."""
        self.inspect(tensors_in(output))
        if not self.pending:
            return
        targets = {node: message for message, nodes in self.pending for node in nodes}
        found, seen = set(), set()
        stack = [t.grad_fn for t in tensors_in(output) if t.grad_fn is not None]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if node in targets:
                found.add(targets[node])
            stack.extend(fn for fn, _ in node.next_functions)
        self._raise([message for message, _ in self.pending if message in found])

    def _raise(self, messages):
        messages = list(dict.fromkeys(messages))
        if not messages:
            return
        if self.hook.strict:
            raise UncoveredOperationError('\n'.join(messages))
        for message in messages:
            warnings.warn(message, stacklevel=4)

    def _where(self):
        """The innermost module of the explained model running now (by its frame's ``self``) and the innermost
        source line outside torch and lxt_ext."""
        if self.names is None:
            self.names = {id(module): name for name, module in self.root.named_modules()}
        names = self.names
        frame, module, source = sys._getframe(1), None, None
        while frame is not None and (module is None or source is None):
            filename = frame.f_code.co_filename
            if source is None and not filename.startswith(_SKIPPED):
                source = f'{filename}:{frame.f_lineno}'
            owner = frame.f_locals.get('self') if source is not None else None
            if module is None and id(owner) in names:
                module = f'{names[id(owner)] or "(model)"} ({type(owner).__qualname__})'
            frame = frame.f_back
        return module or '(model)', source or '?'

    # -- rules ---------------------------------------------------------------------------------------------------

    def statistic(self, func, name, args, kwargs, carrying):
        """A call with a square or a statistic among its carrying inputs (see the module doc)."""
        special = [t for t in carrying if t in self.statistics or t in self.squares]
        if name in _REDUCTIONS and len(carrying) == 1 and carrying[0] in self.squares:
            return self._mark(self.statistics, func(*args, **kwargs))
        if any(t in self.squares for t in special):
            return self.refuse(name, 'a square of a relevance-carrying tensor used otherwise than in a normalisation',
                               func(*args, **kwargs))
        if len(carrying) == 1 and name in _KEEP_STATISTIC:
            return self._mark(self.statistics, func(*args, **kwargs))
        if len(carrying) == 2 and len(special) == 1 and name in _SHIFTS:
            # a threshold shifted by a statistic (Gemma 3n's activation sparsity: mean + k std): the statistic held
            # constant, an offset
            constant = special[0]
            output = func(*_swap(args, constant, constant.detach()), **_swap(kwargs, constant, constant.detach()))
            return self._derive(output, carrying[1] if carrying[0] is constant else carrying[0], True)
        if len(carrying) == 2 and len(special) == 1 and (name in PRODUCTS or name in DIVISIONS):
            # the normalisation: a carrying tensor scaled by (or divided by) a statistic held constant
            constant = special[0]
            if name in DIVISIONS and args[0] is constant:
                return self.refuse(name, 'a division by a relevance-carrying tensor', func(*args, **kwargs))
            output = func(*_swap(args, constant, constant.detach()), **_swap(kwargs, constant, constant.detach()))
            # a gate normalised so (DBRX's routing weights over their norm) is a gate still
            return self._derive(output, carrying[1] if carrying[0] is constant else carrying[0], True, False)
        return self.refuse(name, 'a normalisation statistic of a relevance-carrying tensor used otherwise than to '
                                 'scale it', func(*args, **kwargs))

    def _mark(self, kind, output):
        for tensor in _flat((output,)):
            kind[tensor] = True
        return output

    def elementwise(self, func, name, args, kwargs, carrying):
        if len(carrying) > 1 or args[0] is not carrying[0]:
            return NotImplemented  # a bound that carries relevance too (clamp(x, min=y))
        x, rest = args[0], args[1:]
        inplace = name.endswith('_') or kwargs.get('inplace', False)
        if 'inplace' in kwargs:
            kwargs = dict(kwargs, inplace=False)
        if inplace and name.endswith('_'):
            func = getattr(torch, name[:-1], None) or getattr(torch.nn.functional, name[:-1])
        output = identity_rule(lambda t: func(t, *rest, **kwargs), x.clone() if inplace else x,
                               self.hook.input_stabilizer)
        if inplace:
            x.copy_(output)
            output = x
        self._derive(output, x, False)
        if name in _OFFSET_MAPS:
            self.offset(name, output)
        return self._gate(output)

    def offset(self, name, output):
        """``output`` of an element-wise map whose value at 0 is not 0: held constant in every product, refused where
        relevance would pass it otherwise."""
        for tensor in _flat((output,)):
            self.offsets[tensor] = True
        self.refuse(name, _OFFSET, output, defer=True)

    def product(self, func, name, args, kwargs, carrying):
        if len(carrying) < 2:  # linear in its one carrying factor: a scaling keeps a gate
            return self._derive(func(*args, **kwargs), carrying[0], name in PRODUCTS)
        if len(carrying) > 2 or 'out' in kwargs:
            return NotImplemented
        a, b = carrying
        for gate, other in ((a, b), (b, a)):
            if gate in self.gates and self.roots.get(gate, gate) is self.roots.get(other, other):
                # x * g(x), g computed element-wise from x alone (SiLU, GELU written out): an element-wise function
                # of x, so the identity rule, in either mode: the gate held constant
                return func(*_swap(args, gate, gate.detach()), **_swap(kwargs, gate, gate.detach()))
        if name in ('mul_', '__imul__'):
            output = self._bilinear(torch.mul, (a.clone(), b), {}, (a.clone(), b))
            a.copy_(output)
            return a
        if name in PRODUCTS and (_same(args, (a, b)) or _same(args, (b, a))) and not kwargs:
            gate = self._gate_of(a, b)
            if gate is not None:
                return a.detach() * b if gate is a else a * b.detach()
            return uniform_product(args[0], args[1])
        return self._bilinear(func, args, kwargs, (a, b))

    def _gate_of(self, a, b):
        """Under CP-LRP, the one of ``a`` and ``b`` that is a gate (None: neither, or AttnLRP). Where both are, the
        one made last: the other passed its non-linearity earlier on the way to this product (attention weights
        over values that left a ReLU stem: the weights are the gate)."""
        offsets = [t for t in (a, b) if t in self.offsets]
        if len(offsets) == 1:
            return offsets[0]  # in either mode: the identity rule cannot pass relevance through it
        if self.hook.attention != 'cp':
            return None
        gates = [t for t in (a, b) if t in self.gates]
        if len(gates) == 2:
            return a if self.gates[a] > self.gates[b] else b
        return gates[0] if gates else None

    def _bilinear(self, func, args, kwargs, factors):
        """``func`` bilinear in the two carrying ``factors``: AttnLRP's uniform rule (each factor gets half of its
        plain gradient: ``(f(a, b') + f(a', b)) / 2`` with ``'`` detached, exactly ``f(a, b)`` in floating point),
        or under CP-LRP a gate among them held constant."""
        a, b = factors
        gate = self._gate_of(a, b)
        if gate is not None:
            return func(*_swap(args, gate, gate.detach()), **_swap(kwargs, gate, gate.detach()))
        if _name(func) in ('matmul', '__matmul__') and _same(args, (a, b)) and not kwargs and a.dim() > 1 \
                and b.dim() > 1:
            return uniform_matmul(a, b)
        halves = []
        for constant in (b, a):
            swapped = _swap(args, constant, constant.detach()), _swap(kwargs, constant, constant.detach())
            halves.append(func(*swapped[0], **swapped[1]))
        return halves[0] * 0.5 + halves[1] * 0.5

    def matrix_product(self, func, name, args, kwargs, carrying):
        if len(carrying) >= 2:
            return self.product(func, name, args, kwargs, carrying)
        rule = self.hook.linear_rule
        if rule is None or isinstance(rule, KeepGradient):
            return func(*args, **kwargs)  # the composite's Linear rule is the plain gradient
        x = carrying[0]
        if name in ('matmul', '__matmul__', 'mm') and args[0] is x and len(args) == 2 and not kwargs \
                and isinstance(args[1], torch.Tensor) and args[1].dim() == 2:
            return linear_rule_apply(rule, x, args[1].mT)
        if name == 'addmm' and len(args) == 3 and args[1] is x and not kwargs and args[2].dim() == 2:
            return linear_rule_apply(rule, x, args[2].mT, args[0])
        return func(*args, **kwargs)  # a constant linear map the Linear rule cannot take: its epsilon -> 0 form

    def linear(self, func, name, args, kwargs, carrying):
        bound = dict(zip(('input', 'weight', 'bias'), args), **kwargs)
        x, weight, bias = bound['input'], bound['weight'], bound.get('bias')
        if self.carries(bias):
            return NotImplemented
        if not self.carries(x):
            return func(*args, **kwargs)  # linear in the carrying weight
        if self.carries(weight):
            return self._bilinear(func, args, kwargs, (x, weight))
        return linear_rule_apply(self.hook.linear_rule, x, weight, bias)

    def convolution(self, func, name, args, kwargs, carrying):
        rule = self.hook.conv_rule
        x = args[0] if args else kwargs.get('input')
        if not _same(carrying, [x]):
            return NotImplemented
        if rule is None or isinstance(rule, KeepGradient):
            return func(*args, **kwargs)
        if hasattr(rule, 'convolution'):
            return rule.convolution(**convolution_arguments(name, args, kwargs))
        return self.refuse(name, 'a convolution called functionally, which the composite\'s convolution rule takes '
                                 'only as a module', func(*args, **kwargs))

    def division(self, func, name, args, kwargs, carrying):
        if len(args) == 2 and len(carrying) == 2 and self.sums.get(args[1]) is args[0] \
                and name not in ('__rtruediv__', '__rdiv__'):
            # x / x.sum(): a normalisation, its sum held constant (ConViT's gated attention weights)
            return self._derive(func(args[0], args[1].detach(), **kwargs), args[0], True)
        if len(args) >= 2 and any(args[1] is t for t in carrying) or name in ('__rtruediv__', '__rdiv__'):
            return NotImplemented  # divided by a carrying tensor
        return self._derive(func(*args, **kwargs), carrying[0], True) if len(carrying) == 1 else func(*args, **kwargs)

    def layer_norm(self, func, name, args, kwargs, carrying):
        bound = dict(zip(('input', 'normalized_shape', 'weight', 'bias', 'eps'), args), **kwargs)
        if not _same(carrying, [bound['input']]):
            return NotImplemented
        return layer_norm_identity(bound['input'], bound['normalized_shape'], bound.get('weight'), bound.get('bias'),
                                   bound.get('eps', 1e-5))

    def rms_norm(self, func, name, args, kwargs, carrying):
        bound = dict(zip(('input', 'normalized_shape', 'weight', 'eps'), args), **kwargs)
        x = bound['input']
        if not _same(carrying, [x]):
            return NotImplemented
        return functional_rms_norm_identity(x, bound['normalized_shape'], bound.get('weight'), bound.get('eps'))

    def group_norm(self, func, name, args, kwargs, carrying):
        bound = dict(zip(('input', 'num_groups', 'weight', 'bias', 'eps'), args), **kwargs)
        if not _same(carrying, [bound['input']]):
            return NotImplemented
        return group_norm_identity(bound['input'], bound['num_groups'], bound.get('weight'), bound.get('bias'),
                                   bound.get('eps', 1e-5))

    def normalize(self, func, name, args, kwargs, carrying):
        bound = dict(zip(('input', 'p', 'dim', 'eps'), args), **kwargs)
        x = bound['input']
        if not _same(carrying, [x]) or bound.get('out') is not None:
            return NotImplemented
        norm = x.norm(bound.get('p', 2.0), bound.get('dim', 1), keepdim=True).clamp_min(bound.get('eps', 1e-12))
        return x / norm.detach().expand_as(x)

    def batch_norm(self, func, name, args, kwargs, carrying):
        bound = dict(zip(('input', 'running_mean', 'running_var', 'weight', 'bias', 'training', 'momentum', 'eps'),
                         args), **kwargs)
        x, variance = bound['input'], bound['running_var']
        if not _same(carrying, [x]) or bound.get('training', False) or variance is None:
            return NotImplemented  # batch statistics of the input itself
        # running statistics: linear, g_in = g_out * weight / sqrt(running_var + eps)
        scale = torch.rsqrt(variance.detach() + bound.get('eps', 1e-5))
        if bound.get('weight') is not None:
            scale = scale * bound['weight'].detach()
        return _ScaledChannels.apply(x, scale, lambda t: func(*_swap(args, x, t), **_swap(kwargs, x, t)))

    def attention(self, func, name, args, kwargs, carrying):
        bound = dict(zip(_SDPA_ARGUMENTS, args), **kwargs)
        query, key, value, mask = bound['query'], bound['key'], bound['value'], bound.get('attn_mask')
        if self.carries(mask) or bound.get('dropout_p', 0.0):
            return NotImplemented
        if value.shape[-1] != query.shape[-1] and query.dim() == 4:  # the fused op takes one head dimension
            if key.shape[-3] != query.shape[-3] and not bound.get('enable_gqa', False):
                return func(*args, **kwargs)  # SDPA's own error
            return eager_attention(query, key, value, mask, scale=bound.get('scale'),
                                   is_causal=bound.get('is_causal', False), mode=self.hook.attention,
                                   input_stabilizer=self.hook.input_stabilizer)
        if query.dim() != 4:  # SDPA takes (..., L, E): heads and batches as leading dimensions of any number
            if query.dim() < 3 or key.shape[:-2] != query.shape[:-2] or value.shape[:-2] != query.shape[:-2] \
                    or (mask is not None and mask.dim() > 2):
                return NotImplemented
            lead = query.shape[:-2]
            query, key, value = (t.reshape(-1, 1, *t.shape[-2:]) for t in (query, key, value))
            output = attention_lrp(query, key, value, mask, scale=bound.get('scale'),
                                   is_causal=bound.get('is_causal', False), mode=self.hook.attention)
            return output.reshape(*lead, *output.shape[-2:])
        if key.shape[-3] != query.shape[-3] and not bound.get('enable_gqa', False):
            return func(*args, **kwargs)  # SDPA's own error
        return attention_lrp(query, key, value, mask, scale=bound.get('scale'), is_causal=bound.get('is_causal', False),
                             mode=self.hook.attention)

    def glu(self, func, name, args, kwargs, carrying):
        bound = dict(zip(('input', 'dim'), args), **kwargs)
        a, b = bound['input'].chunk(2, dim=bound.get('dim', -1))
        return self.product(torch.mul, 'mul', (a, self.elementwise(torch.sigmoid, 'sigmoid', (b,), {}, [b])), {},
                            [a, b])


_RULES = {
    'linear': _OperationMode.linear, 'layer_norm': _OperationMode.layer_norm, 'rms_norm': _OperationMode.rms_norm,
    'group_norm': _OperationMode.group_norm, 'normalize': _OperationMode.normalize,
    'batch_norm': _OperationMode.batch_norm, 'scaled_dot_product_attention': _OperationMode.attention,
    'glu': _OperationMode.glu,
}
_GROUPS = (
    (ELEMENTWISE, _OperationMode.elementwise), (PRODUCTS, _OperationMode.product),
    (MATRIX_PRODUCTS, _OperationMode.matrix_product), (DIVISIONS, _OperationMode.division),
    (CONVOLUTIONS, _OperationMode.convolution),
)


@shared_parameters('attention', 'input_stabilizer')
class OperationRules(RuleHook):
    """The operation rules (see the module doc) during the forward of the module it is registered on (the model
    a composite explains): its forward runs under the mode, and every module whose rule covers its operations
    (``covers_operations``) is left to that rule. Registered after the module rules.

    Parameters
    ----------
    linear_rule, conv_rule : zennit.core.Hook, optional
        The composite's rules for Linear maps and convolutions (Gradient x Input convention; None or
        ``KeepGradient``: the plain gradient).
    strict : bool, optional
        Uncovered operations raise ``UncoveredOperationError`` (default True); False: a warning each.
    """
    marks = False  # not the model's rule: the model may have one of its own
    checked = False

    def __init__(self, attention='attnlrp', linear_rule=None, conv_rule=None, input_stabilizer=INPUT_STABILIZER,
                 strict=True):
        super().__init__()
        attention_mode(attention)
        self.attention = attention
        self.linear_rule, self.conv_rule = linear_rule, conv_rule
        self.input_stabilizer = input_stabilizer
        self.strict = strict
        self.scope = _Scope()
        self._handles = []

    def attach(self, module):
        self.scope = _Scope()
        self.explicit_first = any(emits_relevance(child) for child in module.modules())
        for child in module.modules():
            if covers_operations(child):
                self._handles.append(child.register_forward_pre_hook(self.scope.enter))
                self._handles.append(child.register_forward_hook(self.scope.leave, always_call=True))
        inner, hook = module.forward, self

        def forward(*args, **kwargs):
            if not (hook.active and torch.is_grad_enabled()) or hook.scope.depth:
                return inner(*args, **kwargs)
            with _OperationMode(hook, module) as mode:
                if hook.explicit_first:
                    mode.raw = {t: True for t in _flat((*args, *kwargs.values())) if mode.carries(t)}
                output = inner(*args, **kwargs)
                mode.settle(output)
            return output

        self.swap_forward(module, forward)

    def detach(self, module):
        for handle in self._handles:
            handle.remove()
        self._handles = []
