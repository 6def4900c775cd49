"""Reference samples (relevance and activation maximisation, zennit-crp's ``FeatureVisualization``) under
lxt_ext's transformer composites.

zennit-crp's ``FeatureVisualization.run`` registers the composite, records each concept layer's activation in a
forward hook and reads the gradient arriving at the layer's output in a tensor hook as its relevance. Under a
transformer composite (Gradient x Input convention) that gradient ``g`` is not the relevance: the relevance is
``a * g``. :class:`TransformerFeatureVisualization` records ``a * g`` there (activation maximisation is
unchanged), inserts the input taps the layers need (heads, gated MLP neurons) for the run only, and gives the
layers' concepts (:class:`~lxt_ext.concepts.HiddenConcept`, :class:`~lxt_ext.concepts.HeadConcept`) their masks
for the conditional heatmaps of reference samples. A unit's value per sample is its relevance (or activation)
summed over the tokens (``max_target='sum'``) or its largest token (``'max'``), divided by the sample's summed
absolute value over the layer's units when ``abs_norm`` (zennit-crp's default); the samples are ranked by it per
unit. With any other composite (zennit's, lxt_ext's CNN composites) it records the gradient, as zennit-crp does.
"""
import contextlib
import math
import weakref

import numpy as np
import torch
from crp.helper import load_maximization
from crp.hooks import FeatVisHook
from crp.visualization import FeatureVisualization
from tqdm import tqdm
from zennit.composites import NameMapComposite

from ..composites.transformer import TransformerComposite
from .layers import input_taps

__all__ = ['TransformerFeatureVisualization', 'RelevanceFeatVisHook']


class RelevanceFeatVisHook(FeatVisHook):
    """zennit-crp's ``FeatVisHook`` that reads the relevance as ``activation * gradient`` (``relevance=True``)
    or as the gradient (zennit's convention), and takes a module's first output where it returns a tuple.

    Parameters
    ----------
    FV : FeatureVisualization
        Whose ``analyze_activation`` and ``analyze_relevance`` receive the tensors.
    concept : crp.concepts.Concept
        The layer's concept.
    layer_name : str
        The layer.
    dict_inputs : dict
        ``sample_indices`` and ``targets`` of the current batch (filled by the run).
    on_device : str, optional
        Where the tensors are analysed.
    relevance : bool, optional
        Gradient x Input: the relevance is ``activation * gradient`` (default True).
    """

    def __init__(self, FV, concept, layer_name, dict_inputs, on_device, relevance=True):
        super().__init__(FV, concept, layer_name, dict_inputs, on_device)
        self.relevance = relevance

    def post_forward(self, module, input, output):
        tensor = output[0] if isinstance(output, (tuple, list)) else output
        activation = tensor.detach()
        s_indices, targets = self.dict_inputs['sample_indices'], self.dict_inputs['targets']
        moved = activation.to(self.on_device) if self.on_device else activation
        self.FV.analyze_activation(moved, self.layer_name, self.concept, s_indices, targets)
        if tensor.grad_fn is not None:
            hook_ref = weakref.ref(self)

            def wrapper(grad):
                return hook_ref().backward_at(grad, activation)

            tensor.register_hook(wrapper)

    def backward_at(self, grad, activation):
        """Analyse the relevance at the layer (``activation * grad`` or ``grad``); the gradient passes unchanged.

        Parameters
        ----------
        grad : torch.Tensor
            The gradient arriving at the layer's output.
        activation : torch.Tensor
            The layer's output (detached).

        Returns
        -------
        torch.Tensor
            ``grad``.
        """
        relevance = grad.detach() * activation if self.relevance else grad.detach()
        relevance = relevance.to(self.on_device) if self.on_device else relevance
        s_indices, targets = self.dict_inputs['sample_indices'], self.dict_inputs['targets']
        self.FV.analyze_relevance(relevance, self.layer_name, self.concept, s_indices, targets)
        return grad

    def copy(self):
        return self.__class__(self.FV, self.concept, self.layer_name, self.dict_inputs, self.on_device,
                              self.relevance)


class TransformerFeatureVisualization(FeatureVisualization):
    """zennit-crp's ``FeatureVisualization`` for lxt_ext's transformer composites: ``run(composite, start, end,
    batch_size)`` finds each unit's most relevant (``'relevance'``) and most activating (``'activation'``) samples
    of ``dataset[start:end]`` for the samples' classes (the data set's targets); :meth:`reference_indices` and
    zennit-crp's ``get_max_reference`` read them. The data set yields ``(sample, class)`` (e.g. a
    ``TensorDataset``), ``preprocess_fn`` maps a batch of samples to the model's input.

    Parameters
    ----------
    attribution : crp.attribution.CondAttribution
        Usually :class:`~lxt_ext.concepts.TransformerCondAttribution` (conditional heatmaps of reference samples
        in the composite's convention).
    dataset : torch.utils.data.Dataset
        ``dataset[i] -> (sample, class)``.
    layer_map : dict of str to crp.concepts.Concept
        The layers and their concepts (e.g. ``concept_layers(model).layer_map``, or a part of it).
    preprocess_fn : callable, optional
        Applied to each batch before the model.
    max_target : {'sum', 'max'}, optional
        A unit's value per sample: summed over tokens (default) or its largest token.
    abs_norm : bool, optional
        Divide each sample's unit values by their summed absolute value over the layer (default True).
    path : str or pathlib.Path, optional
        Where zennit-crp's result files go.
    device : torch.device, optional
        As zennit-crp's.
    cache : crp.cache.Cache, optional
        As zennit-crp's.
    taps : dict of str to str, optional
        Input taps the layers need (default the attribution's ``taps``).
    """

    def __init__(self, attribution, dataset, layer_map, preprocess_fn=None, max_target='sum', abs_norm=True,
                 path='FeatureVisualization', device=None, cache=None, taps=None):
        super().__init__(attribution, dataset, layer_map, preprocess_fn, max_target, abs_norm, path, device, cache)
        self.taps = dict(getattr(attribution, 'taps', {}) if taps is None else taps)

    @contextlib.contextmanager
    def _tapped(self):
        """The taps inserted once for the run (the attribution inserts none meanwhile)."""
        had = hasattr(self.attribution, 'taps')
        kept = getattr(self.attribution, 'taps', None)
        if had:
            self.attribution.taps = {}
        try:
            with input_taps(self.attribution.model, self.taps):
                yield
        finally:
            if had:
                self.attribution.taps = kept

    def run_distributed(self, composite, data_start, data_end, batch_size=16, checkpoint=500, on_device=None):
        """zennit-crp's ``run_distributed`` with :class:`RelevanceFeatVisHook` (relevance ``a * g`` under a
        transformer composite) and the input taps inserted for the run.

        Parameters
        ----------
        composite : zennit.core.Composite
            The composite (registered for the run).
        data_start, data_end : int
            The samples ``data_start .. data_end - 1``.
        batch_size : int, optional
            Samples per backward.
        checkpoint : int, optional
            Batches per saved result file.
        on_device : str, optional
            Where the tensors are analysed.

        Returns
        -------
        dict
            The saved checkpoint files (zennit-crp's).
        """
        self.saved_checkpoints = {'r_max': [], 'a_max': [], 'r_stats': [], 'a_stats': []}
        last_checkpoint = 0
        samples = np.arange(start=data_start, stop=data_end)
        batch_size = min(batch_size, len(samples))
        batches = math.ceil(len(samples) / batch_size)
        relevance = isinstance(composite, TransformerComposite)
        dict_inputs = {}
        name_map = [([name], RelevanceFeatVisHook(self, concept, name, dict_inputs, on_device, relevance))
                    for name, concept in self.layer_map.items()]
        fv_composite = NameMapComposite(name_map)
        with self._tapped():
            if composite:
                composite.register(self.attribution.model)
            fv_composite.register(self.attribution.model)
            try:
                for b in tqdm(range(batches), dynamic_ncols=True):
                    batch = samples[b * batch_size: (b + 1) * batch_size]
                    data, targets = self.get_data_concurrently(batch, preprocessing=True)
                    targets = np.array([targets] if len(batch) == 1 else
                                       [t.item() if isinstance(t, torch.Tensor) else t for t in targets])
                    try:
                        expanded = [(data[i], t, batch[i]) for i, target in enumerate(targets)
                                    for t in self.multitarget_to_single(target)]
                        if not expanded:
                            continue
                        data = torch.stack([row for row, _, _ in expanded])
                        targets = np.array([t for _, t, _ in expanded])
                        batch = np.array([i for _, _, i in expanded])
                    except NotImplementedError:
                        pass
                    dict_inputs['sample_indices'], dict_inputs['targets'] = batch, targets
                    conditions = [{self.attribution.MODEL_OUTPUT_NAME: [int(t)]} for t in targets]
                    self.attribution(data, conditions, None, exclude_parallel=False)
                    if b % checkpoint == checkpoint - 1:
                        self._save_results((last_checkpoint, batch[-1] + 1))
                        last_checkpoint = batch[-1] + 1
                self._save_results((last_checkpoint, samples[-1] + 1))
            finally:
                fv_composite.remove()
                if composite:
                    composite.remove()
        return self.saved_checkpoints

    def reference_indices(self, layer_name, mode='relevance', r_range=(0, 8)):
        """The ranked samples of every unit of a layer (after :meth:`run`).

        Parameters
        ----------
        layer_name : str
            The layer.
        mode : {'relevance', 'activation'}, optional
            Relevance or activation maximisation.
        r_range : tuple of int, optional
            The ranks ``r_range[0] .. r_range[1] - 1`` (default the top 8).

        Returns
        -------
        tuple of torch.Tensor
            ``(indices, values, tokens)``, each ``(ranks, units)``: the data set indices, the units' (normalised)
            values there, and the token of the unit's largest value (its "receptive field").
        """
        if mode not in ('relevance', 'activation'):
            raise ValueError("`mode` must be `relevance` or `activation`")
        path = (self.RelMax if mode == 'relevance' else self.ActMax).PATH
        d_c_sorted, rel_c_sorted, rf_c_sorted = load_maximization(path, layer_name)
        ranks = slice(*r_range)
        return tuple(torch.as_tensor(np.array(t))[ranks] for t in (d_c_sorted, rel_c_sorted, rf_c_sorted))

    def _attribution_on_reference(self, data, concept_id, layer_name, composite, rf=False, neuron_ids=[],
                                  batch_size=32):
        """zennit-crp's conditional heatmaps of reference samples, masked by the layer's concept (zennit-crp
        masks with ``ChannelConcept``'s, dimension 1: the tokens of a token-major layer)."""
        concept = self.layer_map[layer_name]
        if rf and len(neuron_ids) != len(data):
            raise ValueError("length of 'neuron_ids' must be equal to the length of 'data'")
        heatmaps = []
        for start in range(0, len(data), batch_size):
            batch = data[start:start + batch_size].detach().requires_grad_()
            if rf:
                conditions = [{layer_name: {concept_id: [int(n)]}} for n in neuron_ids[start:start + batch_size]]
                mask_map = {layer_name: concept.mask_rf}
            else:
                conditions = [{layer_name: [concept_id]}]
                mask_map = {layer_name: concept.mask}
            result = self.attribution(batch, conditions, composite, mask_map=mask_map, start_layer=layer_name,
                                      on_device=self.device, exclude_parallel=False)
            heatmaps.append(result.heatmap)
        return torch.cat(heatmaps, dim=0)

