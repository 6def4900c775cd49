"""The one attribution front door.

- ``explainer``: :class:`Explainer` (a batch in, an :class:`Explanation` out: output, relevance, explained
  classes, scores, relevance at named layers), ``explain`` and ``explain_batch``;
- ``targets``: what is explained, turned into the seed at the output (the one place that does so);
- ``interop``: the same attribution in Captum's and Quantus's conventions;
- ``baselines``: attribution methods to compare the LRP composites against (gradient, gradient x input,
  integrated gradients, SmoothGrad, attention rollout).

The seed at the model's output is relevance (zennit's convention) for every composite; lxt_ext's entry points
seed the explained logit, so relevance sums to it.
"""
from .explainer import (Explainer, Explanation, concatenate, emits_relevance, explain, explain_batch, frozen_parameters,
                        logits_of)
from .targets import contrastive

__all__ = ['Explainer', 'Explanation', 'explain', 'explain_batch', 'concatenate', 'emits_relevance', 'logits_of',
           'frozen_parameters', 'contrastive']
