"""Concept Relevance Propagation (`zennit-crp <https://github.com/rachtibat/zennit-crp>`_ 0.6) with lxt_ext's
composites: concepts of transformers and an attribution that reads their relevance right.

lxt_ext's CNN composites (``EpsilonPlusFlat``, ...) are zennit composites in zennit's convention: pass them to
``crp.attribution.CondAttribution`` as they are. The transformer composites (``ViTEpsilon``, ``ViTGamma``,
``LanguageTransformer``) run in the Gradient x Input convention; :class:`TransformerCondAttribution` is
``CondAttribution`` for them (and zennit-crp's own behaviour, unchanged, for any other composite)::

    from crp.concepts import ChannelConcept
    from lxt_ext.composites import ViTEpsilon
    from lxt_ext.concepts import TransformerCondAttribution, concept_layers

    layers = concept_layers(model)             # block outputs, MLP neurons, attention heads of a ViT or LLM
    attribution = TransformerCondAttribution(model, taps=layers.taps)
    block, heads = layers.residual[-1], layers.heads[0]
    result = attribution(images.requires_grad_(), [{'y': [3], heads: [1]}], ViTEpsilon(),
                         record_layer=[block], mask_map=layers.mask_map)
    result.heatmap                             # (N, H, W): the class-3 relevance through head 1 of block 0
    layers.layer_map[block].attribute(result.relevances[block])   # (N, hidden): relevance per channel

The math. Inside a transformer composite the backward carries at each tensor ``a`` a gradient ``g`` whose
product with it is the relevance, ``R = a * g``; the output seed is relevance, as in zennit (the prediction's
value at the target gives relevance summing to the logit). zennit-crp masks ``g`` at a layer's output
(``(m * g) * a = m * R``: masks apply unchanged) and reads ``g`` as relevance; here a recorded layer's relevance
is ``a * g``, a relevance ``R`` given at ``start_layer`` (``init_rel``; default the activations, ``R = a``)
enters as ``g = R / stab(a)`` (``stab(a) = a + eps * sign(a)``, eps the composite's ``input_stabilizer``; 0
where ``a == 0``, whose relevance ``a * g`` is 0 whatever ``g``: relevance given there is dropped), and the
heatmap is the input gradient summed over channels where the first layer emits relevance (the ViT composites,
``lxt_ext.attribution.emits_relevance``) or ``x * g`` summed over the embedding dimension (``LanguageTransformer``
on input embeddings: ``(batch, tokens)``). Every rule's backward is linear in the arriving gradient, so the
conditional heatmaps of a partition of a layer's channels add up to the heatmap of the relevance through that
layer: to the unconditional heatmap at a layer every path passes (the residual stream between blocks), to the
branch's share at a branch (MLP neurons, attention heads).

Token-major activations are ``(batch, tokens, hidden)``: zennit-crp's ``ChannelConcept`` masks dimension 1,
the tokens there (a token concept); :class:`HiddenConcept` masks hidden channels or MLP neurons (the last
dimension), :class:`HeadConcept` attention heads (groups of ``head_dim`` channels of the output projection's
input). zennit-crp records module outputs; the heads' concatenation (and a gated MLP's neurons) is the input of
a projection, which :func:`input_taps` makes the output of an identity module inserted for the call only
(:class:`InputTap`; the model is unchanged afterwards).

Needs zennit-crp 0.6.0, which pins zennit<=0.4.6 but works beside zennit 0.5.1: install it without its
dependencies, ``pip install --no-deps -r requirements-crp.txt`` (from a checkout of lxt_ext) or
``pip install --no-deps zennit-crp==0.6.0``. Not covered yet: relevance maximisation and reference samples
(``crp.visualization.FeatureVisualization`` reads the gradient at layer outputs as relevance in hooks of its
own; under a transformer composite it needs the same ``a * g``).
"""
import contextlib
from typing import NamedTuple

import torch

try:
    from crp.attribution import CondAttribution
    from crp.concepts import ChannelConcept, Concept
except ImportError as error:
    raise ImportError(
        f'lxt_ext.concepts needs zennit-crp 0.6.0 ({error}); install it without its dependencies (it pins '
        'zennit<=0.4.6 but works with 0.5.1): pip install --no-deps -r requirements-crp.txt (in a checkout of '
        'lxt_ext), or pip install --no-deps zennit-crp==0.6.0') from error

from .attribution.explainer import emits_relevance
from .composites.transformer import TransformerComposite
from .transformer.convention import over_stabilized
from .transformer.elementwise import INPUT_STABILIZER

__all__ = ['HiddenConcept', 'HeadConcept', 'InputTap', 'input_taps', 'ConceptLayers', 'concept_layers',
           'TransformerCondAttribution', 'relevance_to_gradient']

_NOT_YET = ('{}: reference samples (relevance maximisation) under lxt_ext\'s transformer composites are not '
            'implemented yet')


def _normed(relevance, abs_norm):
    return relevance / (relevance.abs().sum(-1, keepdim=True) + 1e-10) if abs_norm else relevance


class HiddenConcept(Concept):
    """Hidden channels of a token-major layer output ``(batch, tokens, hidden)`` (a block's output, the
    residual stream) or the neurons of an MLP (``(batch, tokens, intermediate)``): concept ``c`` is index ``c``
    of the LAST dimension, at every token. zennit-crp's ``ChannelConcept`` masks dimension 1 instead, the
    tokens there."""

    @staticmethod
    def mask(batch_id, concept_ids, layer_name=None):
        """A gradient mask (zennit-crp's ``mask_map`` signature): row ``batch_id`` keeps channels
        ``concept_ids`` of the last dimension, at every token.

        Parameters
        ----------
        batch_id : int
            The row of the batch the condition belongs to.
        concept_ids : list of int
            The channels kept.
        layer_name : str, optional
            Unused (zennit-crp passes it).

        Returns
        -------
        callable
            ``grad -> grad`` with the other channels of row ``batch_id`` zeroed.
        """
        def mask_fn(grad):
            mask = torch.zeros(grad.shape[-1], dtype=grad.dtype, device=grad.device)
            mask[concept_ids] = 1
            grad[batch_id] = grad[batch_id] * mask
            return grad

        return mask_fn

    @staticmethod
    def mask_rf(batch_id, c_n_map, layer_name=None):
        """A gradient mask of channels at given tokens: ``c_n_map`` maps a channel to the token indices kept
        (over the flattened dimensions between batch and channel, the tokens of a ``(batch, tokens, hidden)``
        output).

        Parameters
        ----------
        batch_id : int
            The row of the batch the condition belongs to.
        c_n_map : dict of int to list of int
            Channel -> the tokens where it is kept.
        layer_name : str, optional
            Unused (zennit-crp passes it).

        Returns
        -------
        callable
            ``grad -> grad`` with everything else of row ``batch_id`` zeroed.
        """
        def mask_fn(grad):
            row = grad[batch_id]
            mask = torch.zeros(row.shape[-1], row[..., 0].numel(), dtype=grad.dtype, device=grad.device)
            for channel, tokens in c_n_map.items():
                mask[channel, tokens] = 1
            grad[batch_id] = row * mask.T.reshape(row.shape)
            return grad

        return mask_fn

    def attribute(self, relevance, mask=None, layer_name=None, abs_norm=True):
        """The relevance of each channel: summed over the tokens (every dimension between batch and channel).

        Parameters
        ----------
        relevance : torch.Tensor
            A layer's relevance, ``(batch, ..., channels)``.
        mask : torch.Tensor, optional
            Multiplies ``relevance`` first.
        layer_name : str, optional
            Unused (zennit-crp passes it).
        abs_norm : bool, optional
            Divide each row by its summed absolute value (default True, as zennit-crp).

        Returns
        -------
        torch.Tensor
            ``(batch, channels)``.
        """
        if isinstance(mask, torch.Tensor):
            relevance = relevance * mask
        return _normed(relevance.reshape(relevance.shape[0], -1, relevance.shape[-1]).sum(1), abs_norm)

    def reference_sampling(self, relevance, layer_name=None, max_target='sum', abs_norm=True):
        """Not implemented yet (reference samples are the next step).

        Parameters
        ----------
        relevance : torch.Tensor
            A layer's relevance.
        layer_name : str, optional
            The layer.
        max_target : {'sum', 'max'}, optional
            zennit-crp's maximisation target.
        abs_norm : bool, optional
            zennit-crp's normalisation.

        Raises
        ------
        NotImplementedError
            Always.
        """
        raise NotImplementedError(_NOT_YET.format(type(self).__name__))

    def get_rf_indices(self, output_shape, layer_name=None):
        """Not implemented yet (receptive fields of reference samples are the next step).

        Parameters
        ----------
        output_shape : tuple of int
            The layer's output shape.
        layer_name : str, optional
            The layer.

        Raises
        ------
        NotImplementedError
            Always.
        """
        raise NotImplementedError(_NOT_YET.format(type(self).__name__))


class HeadConcept(HiddenConcept):
    """Attention heads at the input of the attention's output projection, ``(batch, tokens, heads * head_dim)``
    (the heads' outputs concatenated, as transformers' ``o_proj``/``c_proj`` and ``nn.MultiheadAttention``'s
    ``out_proj`` take them): concept ``h`` is channels ``h * head_dim .. (h + 1) * head_dim - 1``.

    Parameters
    ----------
    head_dim : int
        The channels of one head.
    """

    def __init__(self, head_dim):
        self.head_dim = int(head_dim)

    def _heads(self, channels):
        if channels % self.head_dim:
            raise ValueError(f'{channels} channels are not whole heads of {self.head_dim}')
        return channels // self.head_dim

    def mask(self, batch_id, concept_ids, layer_name=None):
        """A gradient mask: row ``batch_id`` keeps heads ``concept_ids``, at every token.

        Parameters
        ----------
        batch_id : int
            The row of the batch the condition belongs to.
        concept_ids : list of int
            The heads kept.
        layer_name : str, optional
            Unused (zennit-crp passes it).

        Returns
        -------
        callable
            ``grad -> grad`` with the other heads of row ``batch_id`` zeroed.
        """
        def mask_fn(grad):
            mask = torch.zeros(self._heads(grad.shape[-1]), self.head_dim, dtype=grad.dtype, device=grad.device)
            mask[concept_ids] = 1
            grad[batch_id] = grad[batch_id] * mask.flatten()
            return grad

        return mask_fn

    def mask_rf(self, batch_id, c_n_map, layer_name=None):
        """A gradient mask of heads at given tokens: ``c_n_map`` maps a head to the token indices kept.

        Parameters
        ----------
        batch_id : int
            The row of the batch the condition belongs to.
        c_n_map : dict of int to list of int
            Head -> the tokens where it is kept.
        layer_name : str, optional
            Unused (zennit-crp passes it).

        Returns
        -------
        callable
            ``grad -> grad`` with everything else of row ``batch_id`` zeroed.
        """
        def mask_fn(grad):
            row = grad[batch_id]
            mask = torch.zeros(self._heads(row.shape[-1]), row[..., 0].numel(), dtype=grad.dtype,
                               device=grad.device)
            for head, tokens in c_n_map.items():
                mask[head, tokens] = 1
            mask = mask.T.repeat_interleave(self.head_dim, dim=-1)
            grad[batch_id] = row * mask.reshape(row.shape)
            return grad

        return mask_fn

    def attribute(self, relevance, mask=None, layer_name=None, abs_norm=True):
        """The relevance of each head: summed over its channels and the tokens.

        Parameters
        ----------
        relevance : torch.Tensor
            The relevance of the output projection's input, ``(batch, ..., heads * head_dim)``.
        mask : torch.Tensor, optional
            Multiplies ``relevance`` first.
        layer_name : str, optional
            Unused (zennit-crp passes it).
        abs_norm : bool, optional
            Divide each row by its summed absolute value (default True, as zennit-crp).

        Returns
        -------
        torch.Tensor
            ``(batch, heads)``.
        """
        channels = super().attribute(relevance, mask, layer_name, abs_norm=False)
        heads = channels.reshape(channels.shape[0], self._heads(channels.shape[-1]), self.head_dim).sum(-1)
        return _normed(heads, abs_norm)


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


def relevance_to_gradient(relevance, activation, stabilizer=INPUT_STABILIZER):
    """The gradient that carries ``relevance`` at ``activation`` in the Gradient x Input convention:
    ``relevance / stab(activation)``, 0 where ``activation == 0`` (the relevance there is dropped: ``a * g``
    is 0 whatever ``g``).

    Parameters
    ----------
    relevance : torch.Tensor
        Relevance shaped like ``activation``.
    activation : torch.Tensor
        The layer's output.
    stabilizer : float, optional
        The epsilon of ``stab(a) = a + eps * sign(a)`` (default 1e-10, the composites' ``input_stabilizer``).

    Returns
    -------
    torch.Tensor
    """
    activation = activation.detach()
    relevance = relevance.to(activation)
    gradient = over_stabilized(relevance, activation, stabilizer)
    return gradient.masked_fill_(activation == 0, 0)


class TransformerCondAttribution(CondAttribution):
    """zennit-crp's ``CondAttribution`` for lxt_ext's transformer composites (Gradient x Input convention);
    with any other composite (lxt_ext's and zennit's CNN composites, none) it is zennit-crp's own, unchanged.
    The convention is picked per call from the ``composite`` passed. Under a transformer composite:

    - ``relevances``: each recorded layer's ``activation * gradient``;
    - ``heatmap``: the input gradient summed over dimension 1 where the first layer emits relevance (ViT
      composites: ``(N, H, W)``), else ``x * gradient`` summed over the last dimension for ``(N, tokens,
      embedding)`` inputs (``LanguageTransformer``: ``(N, tokens)``) and over dimension 1 otherwise;
    - ``start_layer``: ``init_rel`` (default that layer's activations) is relevance, entering as the gradient
      :func:`relevance_to_gradient` gives;
    - the output seed is relevance as in zennit-crp (the prediction's value at the target).

    The taps (``taps``, e.g. ``concept_layers(model).taps``) are inserted for each call and removed after it
    (``generate``: when the generator finishes or is closed). ``FeatureVisualization`` registers the composite
    itself and calls with none: it gets zennit-crp's reading (not supported yet under transformer composites).
    The model's output must be ``(N, classes)`` for class conditions (``'y'``): explain a language model's
    last-token logits.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    taps : dict of str to str, optional
        Input taps (see :func:`input_taps`) the conditions or recorded layers name.
    device : torch.device, optional
        As zennit-crp's (default: the parameters' device).
    overwrite_data_grad : bool, optional
        As zennit-crp's (default True).
    no_param_grad : bool, optional
        As zennit-crp's (default True: the parameters' ``requires_grad`` is switched off, for good).
    """

    def __init__(self, model, taps=None, device=None, overwrite_data_grad=True, no_param_grad=True):
        super().__init__(model, device=device, overwrite_data_grad=overwrite_data_grad, no_param_grad=no_param_grad)
        self.taps = dict(taps or {})
        self._convention = None

    @contextlib.contextmanager
    def _call(self, composite, start_layer):
        transformer = isinstance(composite, TransformerComposite)
        previous = self._convention
        self._convention = None if not transformer else {
            'emits': emits_relevance(composite), 'from_layer': bool(start_layer),
            'stabilizer': composite.options.input_stabilizer}
        try:
            with input_taps(self.model, self.taps):
                yield
        finally:
            self._convention = previous

    def _attribute(self, data, conditions, composite=None, record_layer=[], mask_map=ChannelConcept.mask,
                   start_layer=None, init_rel=None, on_device=None, exclude_parallel=True):
        with self._call(composite, start_layer):
            return super()._attribute(data, conditions, composite, record_layer, mask_map, start_layer, init_rel,
                                      on_device, exclude_parallel)

    def generate(self, data, conditions, composite=None, record_layer=[], mask_map=ChannelConcept.mask,
                 start_layer=None, init_rel=None, batch_size=10, on_device=None, exclude_parallel=True,
                 verbose=True):
        """zennit-crp's ``generate`` (the conditions in batches over one forward), read in the composite's
        convention.

        Parameters
        ----------
        data : torch.Tensor
            One sample, requiring grad.
        conditions : list of dict
            zennit-crp's conditions.
        composite : zennit.core.Composite, optional
            The composite.
        record_layer : list of str, optional
            Layers whose activations and relevances are returned.
        mask_map : callable or dict of str to callable, optional
            The masks (default zennit-crp's ``ChannelConcept.mask``).
        start_layer : str, optional
            Where the backward starts instead of the output.
        init_rel : torch.Tensor, int or callable, optional
            The relevance at the output or at ``start_layer``.
        batch_size : int, optional
            Conditions per backward.
        on_device : str, optional
            Where results are kept.
        exclude_parallel : bool, optional
            zennit-crp's: the relevance through the conditioned layers only.
        verbose : bool, optional
            A progress bar.

        Yields
        ------
        crp.attribution.attrResult
            Per batch of conditions.
        """
        with self._call(composite, start_layer):
            yield from super().generate(data, conditions, composite, record_layer, mask_map, start_layer, init_rel,
                                        batch_size, on_device, exclude_parallel, verbose)

    def relevance_init(self, prediction, target_list, init_rel):
        """zennit-crp's seed; at ``start_layer`` under a transformer composite, the relevance it gives turned into
        the gradient that carries it (:func:`relevance_to_gradient`).

        Parameters
        ----------
        prediction : torch.Tensor
            The model's output or ``start_layer``'s activations (detached).
        target_list : list or None
            The classes of the conditions (``'y'``).
        init_rel : torch.Tensor, int, callable or None
            The relevance given (None: the prediction's values).

        Returns
        -------
        torch.Tensor
            The seed of the backward.
        """
        seed = super().relevance_init(prediction, target_list, init_rel)
        convention = self._convention
        if convention is None or not convention['from_layer']:
            return seed
        return relevance_to_gradient(seed, prediction, convention['stabilizer'])

    def backward(self, pred, grad_mask, partial_backward, layer_names, layer_out, generate=False):
        """zennit-crp's backward; under a transformer composite each recorded tensor keeps the gradient that
        arrives at it once. (With ``exclude_parallel`` zennit-crp runs ``torch.autograd.grad`` to each condition
        layer and then a backward from it; since torch 2 the first fills the layer's retained ``.grad`` too, so
        zennit-crp's own relevance of a condition layer is twice the relevance there; its heatmap is right.)

        Parameters
        ----------
        pred : torch.Tensor
            Where the backward starts (the model's output or ``start_layer``'s).
        grad_mask : torch.Tensor
            The seed there.
        partial_backward : bool
            ``exclude_parallel``: the backward passes the condition layers only.
        layer_names : list of str
            The condition layers, the last one first.
        layer_out : dict of str to torch.Tensor
            The recorded layer outputs.
        generate : bool, optional
            Keep the graph (``generate``'s batches).
        """
        if self._convention is None or not (partial_backward and layer_names):
            super().backward(pred, grad_mask, partial_backward, layer_names, layer_out, generate)
            return
        wrt, grad = pred, grad_mask.to(pred)
        for name in layer_names:
            inputs = layer_out[name]
            try:
                (grad,) = self._once(wrt, pred, torch.autograd.grad, wrt, inputs=inputs, grad_outputs=grad,
                                     retain_graph=True)
            except RuntimeError as error:
                if 'allow_unused=True' not in str(error):
                    raise
                raise RuntimeError('the condition layers must follow the model\'s order, the last one first, with '
                                   'exclude_parallel=True; layers in parallel cannot be in one condition') from error
            wrt = inputs
        self._once(wrt, pred, torch.autograd.backward, wrt, grad, retain_graph=generate)

    @staticmethod
    def _once(root, pred, function, *args, **kwargs):
        """``function(*args, **kwargs)`` (a backward from ``root``) without adding to ``root``'s retained
        gradient again, which the backward to it filled already (unless ``root`` is where the backward began)."""
        if root is pred:
            return function(*args, **kwargs)
        kept = root.grad
        try:
            return function(*args, **kwargs)
        finally:
            root.grad = kept

    def heatmap_modifier(self, data, on_device=None):
        """The input heatmap (see the class doc).

        Parameters
        ----------
        data : torch.Tensor
            The input, its ``.grad`` filled.
        on_device : str, optional
            Where the heatmap is put.

        Returns
        -------
        torch.Tensor
        """
        convention = self._convention
        if convention is None or convention['emits']:
            return super().heatmap_modifier(data, on_device)
        relevance = (data.grad * data).detach()
        relevance = relevance.to(on_device) if on_device else relevance
        return relevance.sum(-1) if relevance.dim() == 3 else relevance.sum(1)

    def _collect_hook_activation_relevance(self, layer_out, on_device=None, length=None):
        if self._convention is None:
            return super()._collect_hook_activation_relevance(layer_out, on_device, length)
        activations, relevances = {}, {}
        for name, output in layer_out.items():
            activation = output.detach()[:length]
            relevance = (torch.zeros_like(activation) if output.grad is None
                         else output.grad.detach()[:length] * activation)
            output.grad = None
            activations[name] = activation.to(on_device) if on_device else activation
            relevances[name] = relevance.to(on_device) if on_device else relevance
        return activations, relevances

    @staticmethod
    def _generate_hook(layer_name, layer_out):
        def record(module, input, output):
            tensor = output[0] if isinstance(output, (tuple, list)) else output
            layer_out[layer_name] = tensor
            tensor.retain_grad()

        return record
