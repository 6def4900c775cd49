"""Diagnostics of lxt_ext's transformer composites: operations on the relevance path that no rule covers.

In the Gradient x Input convention (``lxt_ext.transformer``) the plain gradient is exact only through
linear operations; every non-linear one needs a rule. A rule's autograd Function is one node of the
autograd graph (its internals run without grad), so after a forward with the composite registered,
every other node on a path from the explained input to the output must be linear in its
relevance-carrying inputs. ``audit`` checks that, node by node:

- lxt_ext's autograd Functions are rules: covered. Any other autograd Function is opaque: a finding
  (the operation rules of ``lxt_ext.operations`` cannot see inside one);
- node types of ``LINEAR`` (adds, views, concatenation, casts, sums, selections): covered;
- element-wise products and matrix products with one relevance-carrying factor: covered (a linear map);
- a product of two relevance-carrying tensors, a division by one, and every other node (softmax,
  exp, ``F.silu``, ``tanh``, ...): findings.

Under lxt_ext's transformer composites the operation rules give every operation they see its rule or refuse it
in the forward, so an audit there finds what they cannot see (autograd Functions of other libraries) and what
``strict=False`` let pass.

A ``TorchFunctionMode`` and module hooks record, during the audited forward, which module and which
source line created each node, so findings name the module, the operation and the line. Nothing of
this runs outside ``audit`` (or ``record``, for a forward the caller runs): off, it costs nothing.
"""
import contextlib
import dataclasses
import os
import sys

import torch
from torch.overrides import TorchFunctionMode

from ..errors import UncoveredOperationError
from ..operations import tensors_in as _tensors

__all__ = ['LINEAR', 'Finding', 'AuditReport', 'UncoveredOperationError', 'audit', 'record']

# Autograd node types linear in every input (which the plain gradient propagates exactly); the
# others are judged by _uncovered. An allow-list: a node type missing here is reported, never passed.
LINEAR = frozenset({
    'AddBackward0', 'AddBackward1', 'SubBackward0', 'SubBackward1', 'RsubBackward0', 'RsubBackward1', 'NegBackward0',
    'ViewBackward0', 'UnsafeViewBackward0', 'ReshapeAliasBackward0', 'AsStridedBackward0', 'AliasBackward0',
    'TBackward0', 'TransposeBackward0', 'TransposeBackward1', 'PermuteBackward0', 'ExpandBackward0',
    'SqueezeBackward0', 'SqueezeBackward1', 'SqueezeBackward2', 'UnsqueezeBackward0', 'SelectBackward0',
    'SliceBackward0', 'IndexBackward0', 'IndexSelectBackward0', 'GatherBackward0', 'SplitBackward0',
    'SplitWithSizesBackward0', 'UnbindBackward0', 'CatBackward0', 'StackBackward0', 'RepeatBackward0',
    'ConstantPadNdBackward0', 'FlipBackward0', 'RollBackward0', 'TrilBackward0', 'TriuBackward0',
    'CloneBackward0', 'ToCopyBackward0', 'SumBackward0', 'SumBackward1', 'MeanBackward0', 'MeanBackward1',
    # selections by masks computed apart (masked_fill, where): linear in each selected tensor
    'MaskedFillBackward0', 'MaskedFillBackward1', 'WhereBackward0',
    # dropout in training mode: a constant (random) scaling
    'NativeDropoutBackward0',
    'IndexAddBackward0', 'IndexPutBackward0', 'IndexCopyBackward0', 'IndexFillBackward0', 'ScatterBackward0',
    'ScatterAddBackward0', 'MaskedScatterBackward0', 'CumsumBackward0', 'AvgPool1DBackward0', 'AvgPool2DBackward0',
    'AvgPool3DBackward0', 'AdaptiveAvgPool2DBackward0', 'PixelShuffleBackward0', 'PixelUnshuffleBackward0',
    'Im2ColBackward0', 'Col2ImBackward0', 'UnfoldBackward0', 'DiagonalBackward0', 'TakeAlongDimBackward0',
    'ViewAsComplexBackward0', 'ViewAsRealBackward0',
    # positively homogeneous, f(x) = f'(x) x, and selections of the largest: the gradient is the identity rule
    'ReluBackward0', 'LeakyReluBackward0', 'TopkBackward0', 'SortBackward0', 'MaxBackward0', 'MaxBackward1',
    'AmaxBackward0', 'MinBackward0', 'MinBackward1', 'AminBackward0', 'MaxPool2DWithIndicesBackward0',
    # AttnLRP's softmax rule is the softmax's plain gradient in this convention (lxt_ext.operations)
    'SoftmaxBackward0',
})
# Element-wise products: linear in each factor.
_ELEMENTWISE_PRODUCTS = frozenset({'MulBackward0'})
# Matrix products and convolutions: linear in each factor, the layers the composite's Linear rule is for.
_MATRIX_PRODUCTS = frozenset({
    'MmBackward0', 'AddmmBackward0', 'BmmBackward0', 'BaddbmmBackward0', 'MvBackward0', 'AddmvBackward0',
    'DotBackward0', 'LinearBackward0', 'ConvolutionBackward0', 'GroupedMmBackward0',
})
# frames skipped when naming the source line: torch's and lxt_ext's own (its rules run the model's calls)
_SKIPPED = (os.path.dirname(torch.__file__) + os.sep,
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One uncovered operation: the module whose forward ran it (dotted name, ``''``: the model
    itself), its class, the operation (the torch function called and its autograd node), the source
    line (``file:line``) and why its plain gradient is wrong relevance.

    Parameters
    ----------
    module : str
        The dotted name of the module whose forward ran the operation (``''``: the model itself).
    module_type : str
        That module's class name.
    operation : str
        The torch function called and its autograd node, e.g. ``'mul (MulBackward0)'``.
    source : str
        ``file:line`` of the call, outside torch.
    reason : str
        Why the plain gradient of the operation is wrong relevance.
    """
    module: str
    module_type: str
    operation: str
    source: str
    reason: str

    def __str__(self):
        return f'{self.module or "(model)"} ({self.module_type}): {self.operation} at {self.source}: {self.reason}'


@dataclasses.dataclass
class AuditReport:
    """What ``audit`` found (in forward order; one entry per module, operation and line) and how many
    autograd nodes lie on the relevance path.

    Parameters
    ----------
    findings : list of Finding
        The uncovered operations, in forward order.
    nodes : int
        How many autograd nodes lie on the relevance path.
    """
    findings: list
    nodes: int

    def __str__(self):
        if not self.findings:
            return f'every operation on the relevance path ({self.nodes} autograd nodes) is covered'
        listing = '\n  '.join(str(finding) for finding in self.findings)
        return (f'{len(self.findings)} operation(s) on the relevance path have no rule, so their plain gradient '
                f'propagates wrong relevance:\n  {listing}\nGive the module a rule (layer_map=[(type, rule)], or an '
                f'adapter in lxt_ext.models) or compute the operation through lxt_ext.transformer\'s rules.')

    def check(self):
        """Raise ``UncoveredOperationError`` if anything was found.

        Returns
        -------
        AuditReport
            This report, when nothing was found.
        """
        if self.findings:
            error = UncoveredOperationError(str(self))
            error.report = self
            raise error
        return self


@dataclasses.dataclass(frozen=True)
class _Origin:
    module: str
    function: str
    source: str
    order: int


class _Recorder(TorchFunctionMode):
    """Notes the module running, the torch function and the calling line of every autograd node a
    forward creates (nodes a call creates inside C++, and those of autograd Functions, which no mode
    sees, go to the call that first returns a tensor depending on them)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.modules = []
        self.origins = {}
        self._types = {}
        self._handles = []

    def __enter__(self):
        for name, module in self.model.named_modules():
            self._types[name] = type(module).__qualname__
            self._handles.append(module.register_forward_pre_hook(self._entering(name)))
            self._handles.append(module.register_forward_hook(self._leaving, always_call=True))
        return super().__enter__()

    def _entering(self, name):
        def hook(module, args):
            self.modules.append(name)
        return hook

    def _leaving(self, module, args, output):
        self.modules.pop()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if torch.is_grad_enabled():
            new = [t.grad_fn for t in _tensors(result) if t.grad_fn is not None and t.grad_fn not in self.origins]
            if new:
                self._note(new, getattr(func, '__name__', repr(func)))
        return result

    def _note(self, nodes, function):
        origin = _Origin(self.modules[-1] if self.modules else '', function, _caller(), len(self.origins))
        while nodes:
            node = nodes.pop()
            if node is not None and node not in self.origins:
                self.origins[node] = origin
                nodes.extend(fn for fn, _ in node.next_functions)

    def report(self, outputs, inputs):
        """The ``AuditReport`` of the graph from ``outputs`` (tensors) back to ``inputs`` (tensors)."""
        roots = [t.grad_fn for t in outputs if t.grad_fn is not None]
        if not roots:
            raise ValueError('the audited output does not require grad: run the forward with grad enabled on an '
                             'input that requires grad')
        targets = {torch.autograd.graph.get_gradient_edge(x).node for x in inputs}
        reaches = _reaching(roots, targets)
        if not any(reaches[root] for root in roots):
            raise ValueError('the audited output does not depend on the explained input')
        unknown = _Origin('', '?', '?', len(self.origins))
        findings = {}
        path = [node for node, reached in reaches.items() if reached and node not in targets]
        for node in path:
            reason = _uncovered(node, reaches)
            if reason is not None:
                origin = self.origins.get(node, unknown)
                finding = Finding(origin.module, self._types.get(origin.module, '?'),
                                  f'{origin.function} ({node.name()})', origin.source, reason)
                findings.setdefault(finding, origin.order)
        return AuditReport(sorted(findings, key=findings.get), len(path))


def record(model):
    """A context manager recording a forward of ``model`` for an audit.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose module calls name the operations found.

    Returns
    -------
    context manager
        Entered, it records every torch function called; its ``report(outputs, inputs)`` gives the
        ``AuditReport`` of the graph from ``outputs`` back to ``inputs`` (lists of tensors).

    Examples
    --------
    .. code-block:: python

        with lxt_ext.diagnostics.record(model) as recorder:
            output = model(x)            # x requires grad; the composite is registered
        recorder.report([output], [x]).check()
    """
    return _Recorder(model)


def audit(model, input, forward=None, composite=None):
    """Run ``forward(model, input)`` (default ``model(input)``; it may return a tensor, a tuple or a
    transformers ``ModelOutput``: every tensor in it that requires grad is an output) with ``composite``
    registered for the call (None: the one registered already) and return the ``AuditReport`` of
    the graph from the output back to ``input``. ``.check()`` on it raises ``UncoveredOperationError``
    for each uncovered operation (module, operation and source line).

    Parameters
    ----------
    model : torch.nn.Module
        The model to audit.
    input : torch.Tensor
        Its input (images, or input embeddings of a text model); a detached copy requiring grad is used.
    forward : callable, optional
        ``forward(model, x)`` runs the model (default ``model(x)``).
    composite : zennit.core.Composite, optional
        Registered for the call; None: the rules registered on the model already.

    Returns
    -------
    AuditReport
        The uncovered operations on the relevance path (``.check()`` raises if there is any).
    """
    forward = forward or (lambda model, x: model(x))
    x = input.detach().requires_grad_()
    registered = composite.context(model) if composite is not None else contextlib.nullcontext()
    with registered, torch.enable_grad(), record(model) as recorder:
        outputs = [t for t in _tensors(forward(model, x)) if t.requires_grad]
    return recorder.report(outputs, [x])


def _caller():
    """``file:line`` of the innermost frame outside torch and lxt_ext that led to this call."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
    return '?' if frame is None else f'{frame.f_code.co_filename}:{frame.f_lineno}'


def _reaching(roots, targets):
    """``node -> whether a target is reachable from it`` for every node reachable from ``roots``
    (iteratively, in post-order: graphs of deep models exceed Python's recursion limit)."""
    reaches, stack = {}, [(root, False) for root in roots]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            reaches[node] = any(reaches[fn] for fn, _ in node.next_functions if fn is not None)
        elif node not in reaches:
            if node in targets:
                reaches[node] = True
                continue
            stack.append((node, True))
            stack.extend((fn, False) for fn, _ in node.next_functions if fn is not None and fn not in reaches)
    return reaches


def _uncovered(node, reaches):
    """Why ``node``'s plain gradient is wrong relevance, or None where it is right (see the module doc)."""
    forward_cls = getattr(node, '_forward_cls', None)
    if forward_cls is not None:
        if forward_cls.__module__.split('.')[0] == 'lxt_ext':
            return None
        return (f'the backward of the autograd Function {forward_cls.__module__}.{forward_cls.__qualname__}, '
                f'which is no lxt_ext rule')
    name = node.name().rsplit('::', 1)[-1]
    carrying = [fn is not None and reaches.get(fn, False) for fn, _ in node.next_functions]
    if name in LINEAR:
        return None
    if name in _ELEMENTWISE_PRODUCTS or name in _MATRIX_PRODUCTS:
        return 'a product of two relevance-carrying tensors' if sum(carrying) > 1 else None
    if name == 'DivBackward0':
        return 'a division by a relevance-carrying tensor' if carrying[1] else None
    if name == 'DivBackward1':  # by a number
        return None
    return 'a non-linear operation'
