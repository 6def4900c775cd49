"""The taps behind ``lxt_ext.diagnostics.conservation``: module hooks that copy every module call's inputs (before
any rule's hooks) and outputs (after them) through an identity Function whose backward adds the relevance
passing to the module's sums (``ModuleRelevance``)."""
import weakref

import torch

from ..core import rule_of
from ..operations import alias, emits_relevance
from ..transformer.convention import seeded_with_relevance
from .report import PROBLEMS, ConservationReport, ModuleRelevance

__all__ = []


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


def _attention_mode(module):
    """The attention mode of the lxt_ext attention rule on ``module``, or None."""
    rule = rule_of(module)
    return getattr(rule, 'attention', None)


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
                copy = alias(_Tap.apply(tensor, probe), tensor)
                self._tapped[id(copy)] = copy
                self._probes[id(copy)] = probe
                return copy

            args, kwargs = _map_tensors(args, tap), _map_tensors(kwargs, tap)
            if emits_relevance(module):
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
                return alias(_Tap.apply(tensor, _Probe(entry, tensor.detach(), 'out', explicit)), tensor)

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
