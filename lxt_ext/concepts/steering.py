"""Steering: amplify or suppress chosen units of a layer while the model runs (classification or generation),
and the relevance of the steered model.

The math. Steering the units ``U`` of a layer by ``f`` replaces its output ``a`` (``(..., C)``, units on the
last dimension: a token-major ``(batch, tokens, hidden)`` output's channels, MLP neurons) by ``a' = s * a`` with
``s_c = f`` for ``c`` in ``U`` and 1 elsewhere (only at the chosen tokens, if given). The steered model is the
model with this linear map inserted, so any LRP composite explains it exactly as it explains a model with one
more diagonal linear layer: the backward through ``s * a`` is ``g = s * g'``, and the relevance at the layer,
``a * g = s * a * g' = a' * g'``, is the relevance of the steered activation. A steered unit's relevance is
scaled with its activation's contribution downstream: 0 for a suppressed unit (``f = 0``), and conservation
holds for the steered model wherever it holds for the model (CP-LRP with offsets zeroed: the input relevance
sums to the steered logit). ``f = 1`` is bitwise the unsteered model (``a * 1.0 == a``). Negative factors are
allowed (they flip a unit: still a linear map); NaN and infinite factors are not.

Usage::

    from lxt_ext.attribution import explain_batch
    from lxt_ext.composites import ViTGamma
    from lxt_ext.concepts import steer, most_relevant_units

    layer = 'encoder.layers.encoder_layer_3.mlp.1'                 # the last block's MLP neurons (GELU output)
    top = most_relevant_units(model, x, ViTGamma(), layer, target=labels, k=8)
    with steer(model, {layer: (top.units, 0.0)}):                  # suppress them
        logits = model(x)
    with steer(model, {layer: (top.units, 3.0)}):                  # amplify; generate() works the same
        e = explain_batch(model, x, ViTGamma(), target=labels)     # the relevance of the steered model

Layers are module names (the module's output is scaled; a tuple output's first tensor) or the input taps of
:func:`lxt_ext.concepts.concept_layers` (``<llama block>.mlp.neurons``: the gated neurons, ``<attention>.heads``:
then units are heads, each ``head_dim`` channels of the output projection's input), steered by a forward
pre-hook on the projection. torchvision's ``nn.MultiheadAttention`` computes its output projection
functionally: its heads cannot be steered with a hook (a ``ValueError`` says so; steer the block's output or
its MLP neurons, or use a model whose output projection is a module call). Hooks are removed on exit: the model's hook
dictionaries are as before.
"""
import contextlib
from typing import NamedTuple

import torch

__all__ = ['Steering', 'steer', 'UnitRelevance', 'most_relevant_units']


def _units(name, units):
    units = torch.as_tensor(units).flatten()
    if units.numel() and (units.is_floating_point() or units.is_complex() or units.dtype == torch.bool):
        raise TypeError(f'steer: the units of {name!r} must be integer indices, got {units.dtype}')
    units = units.long()
    if (units < 0).any():
        raise IndexError(f'steer: the units of {name!r} must be 0 or more, got {units.tolist()}')
    return units


def _factor(name, factor, count):
    factor = torch.as_tensor(factor, dtype=torch.float64).flatten()
    if factor.numel() not in (1, count):
        raise ValueError(f'steer: {name!r} needs one factor or one per unit ({count}), got {factor.numel()}')
    if not torch.isfinite(factor).all():
        raise ValueError(f'steer: the factor of {name!r} must be finite, got {factor.tolist()}')
    return factor


def _layers(model, name):
    """(module to hook, 'output' or 'input', channels per unit) for ``name``."""
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name], 'output', 1
    from .classes import HeadConcept
    from .layers import concept_layers
    try:
        found = concept_layers(model)
    except TypeError:
        found = None
    if found is not None and name in found.taps:
        target = modules[found.taps[name]]
        parent = modules.get(name.rpartition('.')[0])
        if isinstance(parent, torch.nn.MultiheadAttention) and target is parent.out_proj:
            raise ValueError(f'steer: {name!r} are the heads of a torch.nn.MultiheadAttention, whose output '
                             f'projection is computed functionally: no hook sees them')
        concept = found.layer_map[name]
        width = concept.head_dim if isinstance(concept, HeadConcept) else 1
        return target, 'input', width
    raise KeyError(f'steer: no module or concept tap named {name!r} in {type(model).__name__}')


class Steering:
    """Scale chosen units of one or more layers of ``model`` by factors while registered (a context manager;
    :func:`steer` is the short form). See the module's docstring for the math.

    Parameters
    ----------
    model : torch.nn.Module
        The model (any lxt_ext or zennit composite may be registered on it, before or after).
    layers : dict of str to tuple
        Layer name -> ``(units, factor)``: integer unit indices (channels on the output's last dimension, MLP
        neurons, or heads for a ``heads`` tap of :func:`lxt_ext.concepts.concept_layers`) and a finite factor
        (one, or one per unit; 0 suppresses, > 1 amplifies, < 0 flips).
    tokens : int, slice or sequence of int, optional
        Steer only these positions of dimension 1 (tokens of a ``(batch, tokens, hidden)`` output) of each
        forward call; with a KV cache a generation step's call holds the new tokens only. Default: all.

    Raises
    ------
    KeyError
        An unknown layer name.
    IndexError
        A negative unit index, or (in the forward) one beyond the layer's width.
    ValueError, TypeError
        A non-finite factor, a factor count that matches neither 1 nor the units, non-integer units.
    """

    def __init__(self, model, layers, tokens=None):
        self.model = model
        self.tokens = tokens
        self.handles = []
        self._plans = []
        for name, spec in layers.items():
            if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
                raise TypeError(f'steer: {name!r} needs (units, factor), got {spec!r}')
            module, where, width = _layers(model, name)
            units = _units(name, spec[0])
            factor = _factor(name, spec[1], units.numel())
            self._plans.append((name, module, where, width, units, factor))

    def _scale(self, name, width, units, factor, value):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f'steer: {name!r} gave a {type(value).__name__}, not a floating point tensor')
        size = value.shape[-1]
        if size % width:
            raise ValueError(f'steer: {name!r} has {size} channels, not a multiple of head_dim {width}')
        count = size // width
        if units.numel() and int(units.max()) >= count:
            raise IndexError(f'steer: {name!r} has {count} units (0..{count - 1}), got unit {int(units.max())}')
        scale = torch.ones(count, dtype=torch.float64)
        scale[units] = factor
        scale = scale.repeat_interleave(width).to(device=value.device, dtype=value.dtype)
        if self.tokens is None:
            return value * scale
        if value.dim() < 3:
            raise ValueError(f'steer: tokens given, but {name!r} gave shape {tuple(value.shape)} (no token dimension)')
        chosen = torch.zeros(value.shape[1], dtype=torch.bool)
        chosen[self.tokens] = True
        shape = [1] * value.dim()
        shape[1] = value.shape[1]
        mask = chosen.view(shape).to(value.device)
        return torch.where(mask, value * scale, value)

    def __enter__(self):
        try:
            for name, module, where, width, units, factor in self._plans:
                def scale(value, name=name, width=width, units=units, factor=factor):
                    return self._scale(name, width, units, factor, value)

                if where == 'output':
                    def hook(module, args, output, scale=scale):
                        if isinstance(output, tuple):
                            return (scale(output[0]), *output[1:])
                        if not isinstance(output, torch.Tensor) and hasattr(output, 'to_tuple'):
                            key = next(iter(output.keys()))
                            output[key] = scale(output[key])
                            return output
                        return scale(output)
                    self.handles.append(module.register_forward_hook(hook))
                else:
                    def pre_hook(module, args, scale=scale):
                        return (scale(args[0]), *args[1:]) if args else None
                    self.handles.append(module.register_forward_pre_hook(pre_hook))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self):
        """Remove the hooks (the model is as before)."""
        while self.handles:
            self.handles.pop().remove()

    def __exit__(self, *exc):
        self.remove()
        return False


def steer(model, layers, tokens=None):
    """Steer ``model`` while in the context: :class:`Steering` ``(model, layers, tokens)``.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    layers : dict of str to tuple
        Layer name -> ``(units, factor)``.
    tokens : int, slice or sequence of int, optional
        Positions of dimension 1 to steer (default all).

    Returns
    -------
    Steering
        A context manager; the hooks are registered on entering.
    """
    return Steering(model, layers, tokens)


class UnitRelevance(NamedTuple):
    """What :func:`most_relevant_units` returns (a named tuple of these fields).

    Parameters
    ----------
    units : torch.Tensor
        The ``k`` most relevant units, most relevant first, ``(k,)`` long.
    relevance : torch.Tensor
        Every unit's relevance (summed over tokens and the batch), ``(units,)``.
    """
    units: torch.Tensor
    relevance: torch.Tensor


def most_relevant_units(model, x, composite, layer, target=None, k=1, forward=None):
    """The ``k`` units of ``layer`` with the highest relevance for ``target`` (signed, summed over tokens and the
    batch): ``Explainer``'s latent relevance (output x gradient) at the layer.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    x : torch.Tensor
        The input batch.
    composite : zennit.core.Composite or None
        The composite (None: gradient x activation).
    layer : str
        A module name (units: its output's last dimension) or an input tap of
        :func:`lxt_ext.concepts.concept_layers` (``...mlp.neurons``; ``...heads``: units are heads).
    target : None, int, torch.Tensor or callable, optional
        What is explained (``lxt_ext.attribution.targets``; default each row's top class).
    k : int, optional
        How many units.
    forward : callable, optional
        ``forward(model, x) -> output``, as for ``Explainer``.

    Returns
    -------
    UnitRelevance
    """
    from ..attribution.explainer import Explainer
    from .classes import HeadConcept
    from .layers import concept_layers, input_taps

    modules = dict(model.named_modules())
    width, taps = 1, {}
    if layer not in modules:
        try:
            found = concept_layers(model)
        except TypeError:
            found = None
        if found is None or layer not in found.taps:
            raise KeyError(f'most_relevant_units: no module or concept tap named {layer!r} in {type(model).__name__}')
        taps = {layer: found.taps[layer]}
        concept = found.layer_map[layer]
        width = concept.head_dim if isinstance(concept, HeadConcept) else 1
    with input_taps(model, taps) if taps else contextlib.nullcontext(), \
            Explainer(model, composite, forward=forward, layers=[layer]) as explainer:
        relevance = explainer(x, target).latent[layer]
    relevance = relevance.double().reshape(-1, relevance.shape[-1]).sum(0)
    if width > 1:
        relevance = relevance.view(-1, width).sum(1)
    k = int(k)
    if not 0 < k <= relevance.numel():
        raise ValueError(f'most_relevant_units: k must be in 1..{relevance.numel()} for {layer!r}, got {k}')
    return UnitRelevance(relevance.topk(k).indices, relevance)

