"""Conservation check: relevance in vs out of every module call, for people porting an architecture.

The relevance of a tensor t, by the composite's convention:

- Gradient x Input (lxt_ext's transformer composites; ``composite=None``, the plain gradient):
  ``R_t = sum(t * g_t)``, with ``g_t`` the gradient of t;
- explicit (zennit's composites, and the tensors before a transformer composite's first layer, whose
  rule emits relevance): ``R_t = sum(g_t)``.

For each module call, ``R_out`` sums over its output tensors (``g``: what arrives from every consumer)
and ``R_in`` over its input tensors (``g``: what this call alone sends back; each input passes an
identity autograd node of its own, so the other uses of a residual stream do not count). A conservative
rule has ``R_in = R_out``. Leaks add up: relevance passes linear operations (adds, reshapes,
concatenation) exactly in both conventions, so a module's ``leak = R_in - R_out`` is the sum of the
leaks of the calls and operations inside it, and ``own = leak - sum(children's leaks)`` is what its own
code (functional operations between its children, constants it adds) loses or creates. Modules run
without their hooks (``module.forward(x)`` called directly, or the children a rule computes
functionally, like ``nn.MultiheadAttention``'s projections) count as their caller's own code.

Problems, in the order relevance meets them (``ConservationReport.modules``: backward order, the
model's last module first and children before the module holding them):

- ``nan``: the relevance leaving a module (R_in) holds NaN/Inf although the relevance arriving (R_out)
  is finite; ``nan in forward``: a module's output turned NaN/Inf from finite inputs (checked first, in
  forward order);
- ``explodes``: ``sum|r_in| > explode * max(sum|r_out|, |R_model|)`` where no child exploded;
- ``leaks``: ``|own| > rtol * max(|R_out|, |R_model|) + 64 eps(dtype) * mass``, the second term the
  rounding of the sums (``mass``: the summed ``|r|`` of the module's and its descendants' inputs and
  outputs), ``R_model`` the relevance of the explained output.

AttnLRP's softmax rule does not conserve by design: attention modules under it are marked ``attnlrp``
and their own leak is no problem (check with ``attention='cp'`` for a strict test). Biases and other
additive constants take relevance too: ``zero_bias`` zeroes them for the check (``ADDITIVE``; the
model is restored bitwise afterwards).

The check keeps a copy of every module input on the relevance path until the backward is done.
"""
import contextlib
import dataclasses
import fnmatch
import math
import weakref

import torch

from ..attribution import _first_tensor, seed
from ..checks import NonFiniteError
from ..core import rule_of
from ..composites.transformer import TransformerComposite
from ..transformer.convention import ExplicitRelevance, relevance_seeded, seeded_with_relevance

__all__ = ['ADDITIVE', 'ModuleRelevance', 'ConservationReport', 'ConservationError', 'conservation', 'zeroed']

# Names (fnmatch patterns of parameter and buffer names) of the additive constants ``zero_bias`` zeroes:
# biases, BatchNorm's running mean (its bias is b - mean * w / std), and the embeddings that
# torchvision, timm and transformers add to the relevance path (position, class and token-type tokens).
ADDITIVE = ('*bias', '*running_mean', '*pos_embedding', '*class_token', '*pos_embed', '*cls_token', '*reg_token',
            '*position_embeddings*', '*token_type_embeddings*', '*wpe.weight')
PROBLEMS = ('nan in forward', 'nan', 'explodes', 'leaks')


@dataclasses.dataclass
class ModuleRelevance:
    """One module's relevance, summed over its calls: ``r_out``/``r_in`` (signed sums), ``abs_out``/
    ``abs_in`` (sums of ``|r|``), ``leak = r_in - r_out``, ``own`` (its leak less its children's), ``status``
    (``'ok'``, ``'attnlrp'``, ``'nan received'``, ``'not reached'`` (the pass stopped before), or one of
    ``PROBLEMS``), ``explicit`` (its input
    relevance was read in zennit's explicit convention) and ``children`` (how many of the modules inside
    it were called).

    Parameters
    ----------
    name : str
        The module's dotted name (``''``: the model).
    type : str
        Its class name.
    calls : int
        How many times it was called.
    r_out, r_in : float
        The signed relevance of its outputs and inputs, summed over the calls.
    abs_out, abs_in : float
        The sums of ``|r|`` of its outputs and inputs.
    leak : float
        ``r_in - r_out``.
    own : float
        Its leak less its children's: what its own code loses or creates.
    status : str
        ``'ok'``, ``'attnlrp'``, ``'nan received'``, ``'not reached'``, or one of ``PROBLEMS``.
    explicit : bool
        Whether its input relevance was read in zennit's explicit convention.
    attnlrp : bool
        Whether it is an attention module under AttnLRP (its own leak is by design).
    finite_out, finite_in : bool
        Whether the relevance of its outputs and inputs was finite.
    forward_nan : bool
        Whether its forward output turned NaN/Inf from finite inputs.
    reached, reached_in : bool
        Whether relevance reached its outputs, and its inputs, in backward.
    children : int
        How many modules inside it were called.
    eps : float
        The machine epsilon of the relevance's dtype (the rounding term of the tolerance).
    order : int
        The order of its first call in forward.
    completed : int
        The order in which its forward calls completed (children before parents; -1: never).
    """
    name: str
    type: str
    calls: int = 0
    r_out: float = 0.
    r_in: float = 0.
    abs_out: float = 0.
    abs_in: float = 0.
    leak: float = 0.
    own: float = 0.
    status: str = 'ok'
    explicit: bool = False
    attnlrp: bool = False
    finite_out: bool = True
    finite_in: bool = True
    forward_nan: bool = False
    reached: bool = False
    reached_in: bool = False
    children: int = 0
    eps: float = 0.
    order: int = 0
    completed: int = -1

    @property
    def label(self):
        return self.name or '(model)'


class ConservationError(AssertionError):
    """Relevance leaks, explodes or turns NaN/Inf in a module (``report.first`` names it).

    Parameters
    ----------
    report : ConservationReport
        The check's result (kept as ``.report``; the message is its summary).
    """

    def __init__(self, report):
        super().__init__(report.summary())
        self.report = report


@dataclasses.dataclass
class ConservationReport:
    """``modules``: every module on the relevance path in backward order (see the module doc);
    ``output_relevance``: the relevance of the explained output; ``first``: the first module with a
    problem, or None; ``zeroed``: the names of the constants zeroed for the check; ``stopped``: the
    error that ended the forward or backward pass early (lxt_ext's NaN/Inf checks), or None.

    Parameters
    ----------
    modules : list of ModuleRelevance
        Every module on the relevance path, in backward order.
    output_relevance : float
        The relevance of the explained output.
    first : ModuleRelevance or None
        The first module with a problem.
    zeroed : list of str
        The names of the parameters and buffers zeroed for the check.
    stopped : str, optional
        The error that ended the pass early, or None.
    rtol : float, optional
        The leak allowed per module, relative (as given to ``conservation``).
    """
    modules: list
    output_relevance: float
    first: object
    zeroed: list
    stopped: str = None
    rtol: float = 0.

    def __getitem__(self, name):
        return next(m for m in self.modules if m.name == name)

    @property
    def input_relevance(self):
        """The relevance reaching the model's input (the model's own R_in)."""
        root = next((m for m in self.modules if m.name == ''), None)
        return None if root is None else root.r_in

    def summary(self):
        if self.first is None:
            head = (f'relevance is conserved in all {len(self.modules)} modules on the relevance path '
                    f'(rtol {self.rtol:g}; output relevance {self.output_relevance:.6g})')
        else:
            m = self.first
            what = {
                'nan in forward': 'its output turned NaN/Inf in the forward pass from finite inputs',
                'nan': 'the relevance it passes back holds NaN/Inf although the relevance arriving is finite',
                'explodes': f'sum |R_in| = {m.abs_in:.4g} from sum |R_out| = {m.abs_out:.4g}',
                'leaks': f'R_in = {m.r_in:.6g} vs R_out = {m.r_out:.6g}; ' + (
                    f'{m.own:+.4g} not explained by its children: its own code leaks (a functional non-linear '
                    f'operation, see lxt_ext.diagnostics.audit, or an added constant such as a bias or a position '
                    f'embedding, see zero_bias)' if m.children else
                    f'its rule (or, without one, its plain gradient) does not conserve'
                    + (f' ({abs(m.leak / m.r_out):.2%} of R_out; an epsilon rule absorbs about eps / |z| by design)'
                       if m.r_out else '')),
            }[m.status]
            head = (f'relevance {m.status} first (in backward order, from the output towards the input) at '
                    f'{m.label} ({m.type}): {what}')
        attnlrp = [m for m in self.modules if m.status == 'attnlrp']
        if attnlrp:
            head += (f'\n{len(attnlrp)} attention module(s) under AttnLRP, whose softmax rule does not conserve by '
                     f'design, are not counted (own leak {sum(m.own for m in attnlrp):+.4g}); check with '
                     f"attention='cp' for a strict test")
        if self.stopped:
            head += f'\nthe pass stopped early: {self.stopped}'
        return head

    def table(self):
        """A plain-text table of every module, in backward order."""
        rows = [('module', 'type', 'R_out', 'R_in', 'leak', 'own', '|R_in|/|R_out|', 'status')]
        for m in self.modules:
            ratio = m.abs_in / m.abs_out if m.abs_out else math.inf if m.abs_in else 1.
            status = m.status + (' (explicit)' if m.explicit else '')
            rows.append((m.label, m.type, f'{m.r_out:.6g}', f'{m.r_in:.6g}', f'{m.leak:+.3g}', f'{m.own:+.3g}',
                         f'{ratio:.3g}', status + (' <- first' if m is self.first else '')))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return '\n'.join('  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)

    def __str__(self):
        return f'{self.table()}\n{self.summary()}'

    def check(self):
        """Raise ``ConservationError`` naming the first module with a problem; return the report otherwise."""
        if self.first is not None:
            raise ConservationError(self)
        return self


@contextlib.contextmanager
def zeroed(model, patterns=ADDITIVE):
    """Zero the floating parameters and buffers of ``model`` whose names match ``patterns`` (fnmatch)
    while in the context (yielding their names); restored bitwise afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose constants are zeroed.
    patterns : tuple of str, optional
        fnmatch patterns of parameter and buffer names (default ``ADDITIVE``: biases, position and
        class-token embeddings, running means).

    Yields
    ------
    list of str
        The names of the tensors zeroed.
    """
    saved = []
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and any(fnmatch.fnmatchcase(name, p) for p in patterns):
                saved.append((name, tensor, tensor.clone()))
                tensor.zero_()
    try:
        yield [name for name, _, _ in saved]
    finally:
        with torch.no_grad():
            for _, tensor, value in saved:
                tensor.copy_(value)


class _Tap(torch.autograd.Function):
    """Identity (a copy, so in-place changes by the consumer stay apart); backward tells ``probe`` the
    gradient passing."""

    @staticmethod
    def forward(ctx, x, probe):
        ctx.probe = probe
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.probe.arrived(grad)
        return grad, None


class _Probe:
    """One tapped tensor of one module call: adds its relevance to the module's sums in backward."""

    def __init__(self, entry, value, side, explicit, source=None):
        self.entry, self.value, self.side, self.explicit = entry, value, side, explicit
        self.source = source  # the tensor an input probe copied (explicit relevance is traced up through it)

    def arrived(self, grad):
        with torch.no_grad():
            r = grad.double() if self.explicit else self.value.double() * grad.double()
            total, mass, finite = float(r.sum()), float(r.abs().sum()), bool(torch.isfinite(r).all())
        entry = self.entry
        entry.reached = True
        entry.eps = max(entry.eps, torch.finfo(grad.dtype).eps)
        if self.side == 'in':
            entry.reached_in = True
            entry.r_in += total
            entry.abs_in += mass
            entry.finite_in &= finite
            entry.explicit |= self.explicit
        else:
            entry.r_out += total
            entry.abs_out += mass
            entry.finite_out &= finite
        self.value = None


def _map_tensors(value, function):
    """``value`` with ``function`` applied to every tensor in it (tensors, tuples, lists, dicts; dicts such
    as transformers' ModelOutput are changed in place)."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        for key, item in list(value.items()):
            mapped = _map_tensors(item, function)
            if mapped is not item:
                value[key] = mapped
        return value
    if isinstance(value, (tuple, list)):
        items = [_map_tensors(item, function) for item in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, '_fields') else type(value)(items)
    return value


def _on_path(tensor):
    return isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.requires_grad


def _emits_relevance(module):
    """Whether the rule registered on ``module`` emits explicit relevance (a transformer composite's first layer)."""
    rule = rule_of(module)
    return isinstance(rule, ExplicitRelevance) or bool(getattr(rule, 'explicit_output', False))


def _attention_mode(module):
    """The attention mode of the lxt_ext attention rule on ``module``, or None."""
    rule = rule_of(module)
    return getattr(rule, 'attention', None) or getattr(rule, 'mode', None)


class _Monitor:
    """Module hooks that tap every module call's inputs (before any rule's hooks) and outputs (after them)."""

    def __init__(self, model, explicit):
        self.model, self.explicit = model, explicit
        self.entries, self._stack, self._handles = {}, [], []
        self._tapped = weakref.WeakValueDictionary()  # id(copy handed to a module) -> the copy
        self._probes = {}                              # id(copy) -> its input probe
        self._completed = 0
        self.output_seeded = False  # a model output came converted (OutputRelevance): its seed is relevance

    def __enter__(self):
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre(name), prepend=True, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post(name), always_call=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _entry(self, name, module):
        if name not in self.entries:
            self.entries[name] = ModuleRelevance(name, type(module).__qualname__, order=len(self.entries),
                                                 attnlrp=_attention_mode(module) == 'attnlrp')
        return self.entries[name]

    def _pre(self, name):
        def hook(module, args, kwargs):
            entry = self._entry(name, module)
            entry.calls += 1
            finite = []

            def tap(tensor):
                if not _on_path(tensor):
                    return tensor
                finite.append(bool(torch.isfinite(tensor.detach()).all()))
                probe = _Probe(entry, tensor.detach().clone(), 'in', self.explicit, source=tensor)
                copy = _Tap.apply(tensor, probe)
                self._tapped[id(copy)] = copy
                self._probes[id(copy)] = probe
                return copy

            args, kwargs = _map_tensors(args, tap), _map_tensors(kwargs, tap)
            if _emits_relevance(module):
                # the first layer's rule emits explicit relevance: read it so here and in the modules above
                # that handed this same tensor down (views included)
                for tensor in _tensors((args, kwargs)):
                    self._mark_explicit(tensor)
            self._stack.append(all(finite))
            return args, kwargs
        return hook

    def _mark_explicit(self, tensor):
        while isinstance(tensor, torch.Tensor):
            key = id(tensor) if self._tapped.get(id(tensor)) is tensor else id(tensor._base) \
                if tensor._base is not None and self._tapped.get(id(tensor._base)) is tensor._base else None
            probe = self._probes.get(key)
            if probe is None:
                return
            probe.explicit = True
            tensor = probe.source

    def _post(self, name):
        def hook(module, args, output):
            inputs_finite = self._stack.pop() if self._stack else True
            entry = self.entries[name]
            entry.completed = self._completed
            self._completed += 1

            def tap(tensor):
                if not _on_path(tensor):
                    return tensor
                if inputs_finite and not bool(torch.isfinite(tensor.detach()).all()):
                    entry.forward_nan = True
                # a model output whose seed is relevance (a transformer composite's output) is read explicitly
                seeded = seeded_with_relevance(tensor)
                self.output_seeded |= seeded
                explicit = self.explicit or seeded
                return _Tap.apply(tensor, _Probe(entry, tensor.detach(), 'out', explicit))

            return None if output is None else _map_tensors(output, tap)
        return hook

    def report(self, output_relevance, rtol, explode, zeroed, stopped):
        for probe in self._probes.values():
            probe.source = None
        modules = sorted((m for m in self.entries.values() if m.reached or m.forward_nan),
                         key=lambda m: -m.order)
        by_name = {m.name: m for m in modules}
        children = {m.name: [] for m in modules}
        for m in modules:
            if m.name:
                parts = m.name.split('.')
                parent = next((p for p in ('.'.join(parts[:i]) for i in range(len(parts) - 1, -1, -1))
                               if p in by_name), None)
                if parent is not None:
                    children[parent].append(m)
        scale = abs(output_relevance)
        mass = {}
        for m in sorted(modules, key=lambda m: m.completed):  # children complete before their parents
            m.leak = m.r_in - m.r_out
            m.own = m.leak - sum(c.leak for c in children[m.name])
            m.children = len(children[m.name])
            mass[m.name] = m.abs_in + m.abs_out + sum(mass[c.name] for c in children[m.name])
            tolerance = rtol * max(abs(m.r_out), scale) + 64 * m.eps * mass[m.name]
            exploded_below = any(c.status == 'explodes' for c in children[m.name])
            if m.forward_nan:
                m.status = 'nan in forward'
            elif not m.finite_out:
                m.status = 'nan received'
            elif stopped and not m.reached_in:
                m.status = 'not reached'
            elif not m.finite_in:
                m.status = 'nan'
            elif m.abs_in > explode * max(m.abs_out, scale) and not exploded_below:
                m.status = 'explodes'
            elif m.attnlrp:
                m.status = 'attnlrp'
            elif not abs(m.own) <= tolerance:
                m.status = 'leaks'
        first = next((m for m in sorted(modules, key=lambda m: m.completed) if m.status == 'nan in forward'), None)
        if first is None:
            first = next((m for m in modules if m.status in PROBLEMS), None)
        return ConservationReport(modules, output_relevance, first, zeroed, stopped, rtol)


def _tensors(value):
    found = []
    _map_tensors(value, lambda t: found.append(t) or t)
    return found


def conservation(model, input, composite=None, forward=None, target=None, zero_bias=True, zero=(), rtol=1e-3,
                 explode=1e3, convention=None):
    """Relevance in vs out of every module of ``model`` for one forward and backward of ``input``.

    ``composite`` is registered for the call (None: the plain gradient, or whatever is registered
    already); ``forward(model, x)`` runs the model (default ``model(x)``; it may return a tensor, a tuple
    or a transformers ModelOutput, whose first tensor is explained); ``target`` as in
    ``lxt_ext.attribution.GradientXInput`` (an int class, None for the top class, a seed tensor or a
    callable ``output -> seed``). ``rtol``: the leak allowed per module (see the module doc; the epsilon
    rule absorbs about ``eps / |z|`` by design, which random-weight models with small outputs ``z`` bring
    near 1e-4). ``zero_bias`` zeroes the constants named in ``ADDITIVE`` for the check,
    ``zero`` more name patterns; the model is restored afterwards. ``convention``: ``'gradient_x_input'``
    or ``'explicit'`` (default: Gradient x Input for lxt_ext's transformer composites and the plain
    gradient, explicit for any other composite, e.g. zennit's). Returns a ``ConservationReport``
    (``print`` it for the table; ``.check()`` raises ``ConservationError`` naming the first module with a
    problem).

    Parameters
    ----------
    model : torch.nn.Module
        The model to check.
    input : torch.Tensor
        A floating input (images, or the input embeddings of a text model).
    composite : zennit.core.Composite, optional
        Registered for the call; None: the plain gradient, or the rules registered already.
    forward : callable, optional
        ``forward(model, x)`` runs the model (default ``model(x)``).
    target : int, torch.Tensor or callable, optional
        What is explained: a class, None for the top class, a seed tensor or ``output -> seed``.
    zero_bias : bool, optional
        Zero the constants named in ``ADDITIVE`` for the check (default True).
    zero : tuple of str, optional
        More fnmatch patterns of parameters and buffers to zero.
    rtol : float, optional
        The leak allowed per module, relative to the larger of its output relevance and the model's
        (default 1e-3).
    explode : float, optional
        A module explodes where ``sum|r_in|`` exceeds this multiple of ``sum|r_out|`` (default 1e3).
    convention : {'gradient_x_input', 'explicit'}, optional
        How tensors' relevance is read (default: from the composite).

    Returns
    -------
    ConservationReport
        Every module's relevance in and out, in backward order, and the first problem.
    """
    if convention is None:
        convention = 'gradient_x_input' if composite is None or isinstance(composite, TransformerComposite) \
            else 'explicit'
    if convention not in ('gradient_x_input', 'explicit'):
        raise ValueError(f"convention must be 'gradient_x_input' or 'explicit', got {convention!r}")
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError('conservation explains a floating tensor input (e.g. images or input embeddings), got '
                        f'{input.dtype if isinstance(input, torch.Tensor) else type(input).__name__}')
    forward = forward or (lambda model, x: model(x))
    patterns = (ADDITIVE if zero_bias else ()) + tuple(zero)
    stopped, output_relevance = None, math.nan
    with zeroed(model, patterns) as names:
        registered = composite.context(model) if composite is not None else contextlib.nullcontext()
        with registered, _Monitor(model, convention == 'explicit') as monitor, torch.enable_grad():
            x = input.detach().requires_grad_()
            try:
                output = _first_tensor(forward(model, x))
                if output is None or not output.requires_grad:
                    raise ValueError('the forward must return a tensor (e.g. the logits) that depends on the input')
                grad_output = seed(output, target)  # relevance (zennit's convention) in both conventions
                with torch.no_grad():
                    output_relevance = float(grad_output.double().sum())
                if convention == 'gradient_x_input' and not monitor.output_seeded:
                    output = relevance_seeded(output)  # no transformer composite: the plain gradient
                torch.autograd.grad(output, x, grad_output, allow_unused=True)
            except NonFiniteError as error:
                stopped = f'{type(error).__name__}: {error}'
    return monitor.report(output_relevance, rtol, explode, names, stopped)
