"""BatchNorm merged into the layer before it without a merged copy of that layer's weight.

zennit's ``MergeBatchNorm`` canonizers (``SequentialMergeBatchNorm``, ``ResNetCanonizer``, ...) set each
layer's weight to ``W' = W * s[c]`` with ``s = gamma / sqrt(running_var + eps)`` per output channel ``c``,
its bias to ``b' = (b - running_mean) * s + beta``, and the BatchNorm to the identity, keeping the
originals for removal: one extra copy of every merged weight for as long as the composite is registered
(93 MB on resnet50, where lxt_ext's whole attribution needs 333 MB more than the model).

An lxt_ext product rule computes its layer's products itself, so it can form ``W'`` for the moment of a
product and drop it: lxt_ext's composites let the canonizer merge, put the original weight back, and give
the layer's rule a ``BatchNormFold`` (``W -> W * s``) that its forward and backward apply to the weight
(``ProductRule.fold``). ``W'`` is formed by zennit's own expression, so it is bitwise zennit's merged
weight. The merged bias (one vector) and the identity BatchNorm stay as the canonizer set them, and
removing the canonizer restores everything as before. A merged layer whose rule is not an lxt_ext
product rule, a transposed convolution (its weight's channel axis differs), a layer merged twice, or a
layer with a forward of its own instance (a user's wrapper, accelerate's hooks: the fold forms the
product itself and would bypass it) keeps zennit's merged copy.
"""
import collections

import torch
from zennit.canonizers import MergeBatchNorm
from zennit.types import ConvolutionTranspose

from .core import ProductRule


class BatchNormFold:
    """``W -> W * s[c]``: a merged BatchNorm's scale ``s`` applied along the weight's output channels."""

    def __init__(self, scale):
        self.scale = scale

    def __call__(self, weight):
        return weight * self.scale[(slice(None),) + (None,) * (weight.dim() - 1)]


def fold_merged_batch_norms(instances, rules):
    """Undo the weight copies of the applied ``MergeBatchNorm`` canonizer ``instances`` whose layers all get
    an lxt_ext product rule in ``rules`` (module -> rule template); return the folds by layer."""
    merges = [instance for instance in instances if isinstance(instance, MergeBatchNorm)]
    merged_count = collections.Counter(layer for merge in merges for layer in merge.linears)
    folds = {}
    for merge in merges:
        if not all(isinstance(rules.get(layer), ProductRule) and merged_count[layer] == 1
                   and not isinstance(layer, ConvolutionTranspose) and 'forward' not in vars(layer)
                   for layer in merge.linears):
            continue
        scale = _scale(merge)
        for layer, (weight, _) in zip(merge.linears, merge.linear_params):
            _restore_weight(layer, weight)
            folds[layer] = BatchNormFold(scale)
    return folds


def _scale(merge):
    """``s`` as zennit's ``merge_batch_norm`` computes it, from the BatchNorm statistics it kept (zennit
    0.5 leaves ``eps`` on the module, zennit 1.0 keeps it with the statistics and zeroes the module's)."""
    params = merge.batch_norm_params
    eps = params.get('eps', merge.batch_norm.eps)
    with torch.no_grad():
        return (params['weight'] / (params['running_var'] + eps) ** .5).detach()


def _restore_weight(layer, weight):
    """Give ``layer`` back its original weight the way the canonizer set the merged one."""
    if 'weight' in vars(layer):  # zennit >= 1.0 sets the merged weight as a plain attribute
        object.__setattr__(layer, 'weight', weight)
    else:  # zennit 0.5 swaps the parameter's data
        layer.weight.data = weight


class BatchNormFolding:
    """A mixin for zennit composites: after the canonizers, BatchNorms merged into layers with lxt_ext
    product rules are folded into those rules instead of kept as merged weight copies
    (this module). Otherwise ``zennit.core.Composite.register`` as it is, except that each rule learns
    its module's name (``module_name``, for error messages) and a failed registration leaves nothing
    behind. All of lxt_ext's composites register this way."""

    def register(self, module):
        self.remove()
        try:
            for canonizer in self.canonizers:
                self.handles += canonizer.apply(module)
            ctx, rules = {}, {}
            for name, child in module.named_modules():
                template = self.module_map(ctx, name, child)
                if template is not None:
                    rules[child] = (name, template)
            folds = fold_merged_batch_norms(self.handles, {child: template for child, (_, template) in rules.items()})
            for child, (name, template) in rules.items():
                hook = template.copy()
                hook.module_name = name
                if child in folds:
                    hook.fold = folds[child]
                self.hook_refs.add(hook)
                self.handles.append(hook.register(child))
        except BaseException:
            self.remove()  # nothing of a failed registration stays on the model
            raise
