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

Steering (:func:`steer`, :mod:`lxt_ext.concepts.steering`): scale chosen units (channels, MLP neurons, heads at a
tap) by a factor while the model runs, classification or ``generate``, with or without a composite registered
(LRP explains the steered model exactly: it is the model with one more diagonal linear map);
:func:`most_relevant_units` picks the units with the highest relevance at a layer.

Needs zennit-crp 0.6.0, which pins zennit<=0.4.6 but works beside zennit 0.5.1: install it without its
dependencies, ``pip install --no-deps -r requirements-crp.txt`` (from a checkout of lxt_ext) or
``pip install --no-deps zennit-crp==0.6.0``.

Reference samples (:class:`TransformerFeatureVisualization`, :mod:`lxt_ext.concepts.maximization`): zennit-crp's
relevance and activation maximisation, the relevance recorded as ``a * g`` under a transformer composite.

Neuron labels (:func:`label_units`, :func:`label_text_units`, :mod:`lxt_ext.concepts.labels`): each unit labelled
by what its reference samples share (their majority class, or the most common n-gram of text spans around its top
token), with a purity score.
"""
import importlib

try:
    importlib.import_module('crp.attribution')
except ImportError as error:
    raise ImportError(
        f'lxt_ext.concepts needs zennit-crp 0.6.0 ({error}); install it without its dependencies (it pins '
        'zennit<=0.4.6 but works with 0.5.1): pip install --no-deps -r requirements-crp.txt (in a checkout of '
        'lxt_ext), or pip install --no-deps zennit-crp==0.6.0') from error

from .attribution import TransformerCondAttribution, relevance_to_gradient
from .classes import HeadConcept, HiddenConcept
from .labels import TextLabel, UnitLabels, label_text_units, label_units
from .layers import LAYER_KINDS, ConceptLayers, InputTap, concept_layers, input_taps, resolve_layer
from .maximization import RelevanceFeatVisHook, TransformerFeatureVisualization
from .steering import Steering, UnitRelevance, most_relevant_units, steer

__all__ = ['HiddenConcept', 'HeadConcept', 'InputTap', 'input_taps', 'ConceptLayers', 'concept_layers', 'resolve_layer',
           'LAYER_KINDS',
           'TransformerCondAttribution', 'relevance_to_gradient', 'Steering', 'steer', 'UnitRelevance',
           'most_relevant_units', 'TransformerFeatureVisualization', 'RelevanceFeatVisHook', 'UnitLabels',
           'label_units', 'TextLabel', 'label_text_units']
