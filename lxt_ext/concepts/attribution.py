"""zennit-crp's ``CondAttribution`` read in the Gradient x Input convention of lxt_ext's transformer composites."""
import contextlib

import torch
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept

from ..attribution.explainer import emits_relevance
from ..composites.transformer import TransformerComposite
from ..transformer.convention import over_stabilized
from ..transformer.elementwise import INPUT_STABILIZER
from .layers import input_taps

__all__ = ['TransformerCondAttribution', 'relevance_to_gradient']


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
    itself and calls with none: it gets zennit-crp's reading (use :class:`~lxt_ext.concepts.TransformerFeatureVisualization`, which
    records ``a * g`` in its own hooks).
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
