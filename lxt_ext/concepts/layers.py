"""Where the concepts of a transformer are: input taps (a projection's input as a module output, for the call
only) and :func:`concept_layers` (block outputs, MLP neurons, attention heads of torchvision ViTs, LLaMA-family and
GPT-2 models)."""
import contextlib
from typing import NamedTuple

import torch

from .classes import HeadConcept, HiddenConcept

__all__ = ['InputTap', 'input_taps', 'ConceptLayers', 'concept_layers', 'resolve_layer', 'LAYER_KINDS']

# the block-relative layer specs of resolve_layer: <kind>:<block>
LAYER_KINDS = ('neurons', 'residual', 'heads')


class InputTap(torch.nn.Identity):
    """An identity module whose output is the input of another module (inserted by :func:`input_taps`):
    zennit-crp records and masks module outputs, and this makes e.g. the heads' concatenation before an
    attention's output projection one. lxt_ext's ``nn.MultiheadAttention`` rule calls a tap named ``heads`` on
    that module itself (its output projection is computed functionally)."""

    def __init__(self):
        super().__init__()


@contextlib.contextmanager
def input_taps(model, taps):
    """Insert an :class:`InputTap` for each entry of ``taps`` while in the context: the tap is added as the
    child ``name`` (its last dotted part) of the module ``name`` points into, and a forward pre-hook of the
    module ``taps[name]`` passes that module's first input through it. A tap named ``<mha>.heads`` on an
    ``nn.MultiheadAttention`` needs no hook (lxt_ext's rule calls it; without lxt_ext's composite it never runs).
    Afterwards the taps and hooks are removed: the model is as before.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    taps : dict of str to str
        Tap name -> the name of the module whose input it records (e.g.
        ``{'model.layers.0.self_attn.heads': 'model.layers.0.self_attn.o_proj'}``).

    Yields
    ------
    list of str
        The tap names.
    """
    modules = dict(model.named_modules())
    inserted, handles = [], []

    def hook(tap):
        def pre_hook(module, args):
            return (tap(args[0]), *args[1:]) if args else None
        return pre_hook

    try:
        for name, target in taps.items():
            parent_name, _, child = name.rpartition('.')
            parent = modules[parent_name] if parent_name in modules else None
            if parent is None or target not in modules:
                raise KeyError(f'input tap {name!r}: no module {parent_name!r} or {target!r} in '
                               f'{type(model).__name__}')
            if child in parent._modules or hasattr(parent, child):
                raise ValueError(f'input tap {name!r}: {parent_name or "the model"} has a {child!r} already')
            if isinstance(parent, torch.nn.Sequential):
                raise ValueError(f'input tap {name!r}: {parent_name} is a Sequential, which would run the tap as a '
                                 f'layer; tap its child directly')
            tap = InputTap()
            parent.add_module(child, tap)
            inserted.append((parent, child))
            if not (isinstance(parent, torch.nn.MultiheadAttention) and child == 'heads'
                    and modules[target] is parent.out_proj):
                handles.append(modules[target].register_forward_pre_hook(hook(tap)))
        yield list(taps)
    finally:
        for handle in handles:
            handle.remove()
        for parent, child in inserted:
            del parent._modules[child]


class ConceptLayers(NamedTuple):
    """What :func:`concept_layers` finds in a model (a named tuple of these fields).

    Parameters
    ----------
    residual : list of str
        The blocks' outputs (the residual stream between blocks), in order.
    neurons : list of str
        Per block, the MLP's neurons: the activation before its output projection.
    heads : list of str
        Per block, the heads' concatenation at the attention's output projection's input (a tap).
    taps : dict of str to str
        The input taps these names need (for :class:`TransformerCondAttribution` or :func:`input_taps`).
    layer_map : dict of str to crp.concepts.Concept
        Every name above -> its concept (:class:`HiddenConcept`, :class:`HeadConcept`).
    """
    residual: list
    neurons: list
    heads: list
    taps: dict
    layer_map: dict

    @property
    def mask_map(self):
        """zennit-crp's ``mask_map``: each layer's concept's ``mask``.

        Returns
        -------
        dict of str to callable
        """
        return {name: concept.mask for name, concept in self.layer_map.items()}


def _join(*parts):
    return '.'.join(part for part in parts if part)


def _torchvision_block(name, module):
    from torchvision.models.vision_transformer import EncoderBlock

    if not isinstance(module, EncoderBlock):
        return None
    mlp = list(module.mlp.named_children())
    linear = [i for i, (_, child) in enumerate(mlp) if isinstance(child, torch.nn.Linear)]
    attention = module.self_attention
    return (_join(name, 'mlp', mlp[linear[0] + 1][0]), None, _join(name, 'self_attention', 'heads'),
            _join(name, 'self_attention', 'out_proj'), attention.head_dim)


def _hf_block(name, module):
    """LLaMA-family decoder layers (``self_attn.o_proj``, ``mlp.down_proj``) and GPT-2 blocks (``attn.c_proj``,
    ``mlp.c_proj``)."""
    for attention, output, down in (('self_attn', 'o_proj', 'down_proj'), ('attn', 'c_proj', 'c_proj')):
        attn, mlp = getattr(module, attention, None), getattr(module, 'mlp', None)
        if (isinstance(attn, torch.nn.Module) and isinstance(getattr(attn, output, None), torch.nn.Module)
                and isinstance(getattr(mlp, down, None), torch.nn.Module) and hasattr(attn, 'head_dim')):
            return (_join(name, 'mlp', 'neurons'), _join(name, 'mlp', down), _join(name, attention, 'heads'),
                    _join(name, attention, output), attn.head_dim)
    return None


def concept_layers(model):
    """The concept layers of a transformer: each block's output (the residual stream), its MLP's neurons and
    its attention heads, with their concepts and the input taps they need. Blocks found: torchvision's
    ``VisionTransformer`` encoder blocks (``vit_b_16``, lxt_ext's embedded model; MLP neurons: the
    activation's output, ``mlp.1``), transformers' LLaMA-family decoder layers (``self_attn.o_proj``,
    ``mlp.down_proj``: LLaMA, Mistral, Qwen2, ...; neurons: ``act(gate) * up``, the tap ``mlp.neurons``) and
    GPT-2 blocks (``attn.c_proj``, ``mlp.c_proj``; neurons: the tap ``mlp.neurons``), wherever they sit in
    ``model`` (a wrapper's names are prefixed). Heads: the tap ``<attention>.heads``.

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    ConceptLayers

    Raises
    ------
    TypeError
        No such blocks in ``model``.
    """
    residual, neurons, heads, taps, layer_map = [], [], [], {}, {}
    for name, module in model.named_modules():
        found = _torchvision_block(name, module) or _hf_block(name, module)
        if found is None:
            continue
        neuron, neuron_input, head, head_input, head_dim = found
        residual.append(name)
        neurons.append(neuron)
        heads.append(head)
        if neuron_input is not None:
            taps[neuron] = neuron_input
        taps[head] = head_input
        layer_map[name] = HiddenConcept()
        layer_map[neuron] = HiddenConcept()
        layer_map[head] = HeadConcept(head_dim)
    if not residual:
        raise TypeError(f'concept_layers found no torchvision ViT, LLaMA-family or GPT-2 blocks in '
                        f'{type(model).__name__}; build the layer map by hand (HiddenConcept, HeadConcept, '
                        f'input_taps)')
    return ConceptLayers(residual, neurons, heads, taps, layer_map)


def resolve_layer(spec, layers):
    """The concept layer of ``spec``.

    Parameters
    ----------
    spec : str
        ``neurons:<block>``, ``residual:<block>``, ``heads:<block>`` (negative blocks count from the end) or a
        name of ``layers.layer_map``.
    layers : lxt_ext.concepts.ConceptLayers
        The model's concept layers.

    Returns
    -------
    str
        The layer's name.

    Raises
    ------
    ValueError
        An unknown layer or block.
    """
    if spec in layers.layer_map:
        return spec
    kind, _, block = spec.partition(':')
    if kind not in LAYER_KINDS:
        raise ValueError(f'unknown layer {spec!r}: give {", ".join(k + ":<block>" for k in LAYER_KINDS)} or one of '
                         f'{list(layers.layer_map)}')
    names = getattr(layers, kind)
    try:
        return names[int(block)]
    except (ValueError, IndexError):
        raise ValueError(f'layer {spec!r}: the block must be an integer in {-len(names)}..{len(names) - 1}') from None
