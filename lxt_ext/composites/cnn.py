"""zennit's LRP composites with lxt_ext's fused rules on every Linear and convolution layer.

Same names, signatures and layer maps as ``zennit.composites``, with lxt_ext's rules of the same name:
ZBox and Flat on the first layer and Norm on sums (ResNetCanonizer's residual ``Sum``) and average
pooling keep only their inputs, and activations and BatchNorm get lxt_ext's Pass, which keeps nothing;
no zennit hook is left. BatchNorms that zennit's canonizers merge into a layer are folded into the
layer's rule rather than kept as a merged weight copy (``BatchNormFolding``). ``use_in_zennit_registry()``
points zennit's own registry names at them.
"""
import torch
from zennit.composites import COMPOSITES, LayerMapComposite, SpecialFirstLayerMapComposite
from zennit.layer import Sum
from zennit.types import Activation, AvgPool, BatchNorm, Convolution, Linear

from .._docstrings import shared_parameters
from ..batch_norm_fold import BatchNormFolding
from ..rules import AlphaBeta, Epsilon, Flat, Gamma, Norm, Pass, ZBox, ZPlus

__all__ = ['use_in_zennit_registry', 'ZennitRegistryOverride', 'ZENNIT_NAMES', 'layer_map_base', 'EpsilonGammaBox',
           'EpsilonPlus', 'EpsilonAlpha2Beta1', 'EpsilonPlusFlat', 'EpsilonAlpha2Beta1Flat']


def layer_map_base(stabilizer=1e-6):
    """zennit's ``layer_map_base`` with lxt_ext's Pass and Norm (no input clones, nothing kept past backward).

    Parameters
    ----------
    stabilizer : float, optional
        The stabilizer of ``Norm`` on sums and average pooling (default 1e-6).

    Returns
    -------
    list of (type, zennit.core.Hook)
        Activations and BatchNorm to ``Pass``, zennit's ``Sum`` and average pooling to ``Norm``.
    """
    return [
        (Activation, Pass()),
        (Sum, Norm(stabilizer=stabilizer)),
        (AvgPool, Norm(stabilizer=stabilizer)),
        (BatchNorm, Pass()),
    ]


def _layer_map(layer_map, stabilizer, conv_rule, epsilon, zero_params):
    return list(layer_map or []) + layer_map_base(stabilizer) + [
        (Convolution, conv_rule),
        (torch.nn.Linear, Epsilon(epsilon=epsilon, zero_params=zero_params)),
    ]


@shared_parameters('composite_epsilon', 'composite_stabilizer', 'layer_map', 'first_map', 'composite_zero_params',
                   'canonizers')
class EpsilonGammaBox(BatchNormFolding, SpecialFirstLayerMapComposite):
    """ZBox on the first convolution, fused gamma on the other convolutions, fused epsilon on Linear.

    Parameters
    ----------
    low : float or torch.Tensor
        The lowest input value of ZBox on the first convolution (e.g. the normalised image's minimum).
    high : float or torch.Tensor
        The highest input value of ZBox on the first convolution.
    gamma : float, optional
        The gamma of the fused gamma rule on the other convolutions (default 0.25).
    """

    def __init__(self, low, high, epsilon=1e-6, gamma=0.25, stabilizer=1e-6, layer_map=None, first_map=None,
                 zero_params=None, canonizers=None):
        conv_rule = Gamma(gamma=gamma, stabilizer=stabilizer, zero_params=zero_params)
        first_map = list(first_map or []) + [
            (Convolution, ZBox(low=low, high=high, stabilizer=stabilizer, zero_params=zero_params))
        ]
        super().__init__(layer_map=_layer_map(layer_map, stabilizer, conv_rule, epsilon, zero_params),
                         first_map=first_map, canonizers=canonizers)


@shared_parameters('composite_epsilon', 'composite_stabilizer', 'layer_map', 'composite_zero_params', 'canonizers')
class EpsilonPlus(BatchNormFolding, LayerMapComposite):
    """Fused z-plus on convolutions, fused epsilon on Linear.
    """

    def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=None, zero_params=None, canonizers=None):
        conv_rule = ZPlus(stabilizer=stabilizer, zero_params=zero_params)
        super().__init__(layer_map=_layer_map(layer_map, stabilizer, conv_rule, epsilon, zero_params),
                         canonizers=canonizers)


@shared_parameters('composite_epsilon', 'composite_stabilizer', 'layer_map', 'composite_zero_params', 'canonizers')
class EpsilonAlpha2Beta1(BatchNormFolding, LayerMapComposite):
    """Fused alpha2-beta1 on convolutions, fused epsilon on Linear.
    """

    def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=None, zero_params=None, canonizers=None):
        conv_rule = AlphaBeta(alpha=2, beta=1, stabilizer=stabilizer, zero_params=zero_params)
        super().__init__(layer_map=_layer_map(layer_map, stabilizer, conv_rule, epsilon, zero_params),
                         canonizers=canonizers)


@shared_parameters('composite_epsilon', 'composite_stabilizer', 'layer_map', 'first_map', 'composite_zero_params',
                   'canonizers')
class EpsilonPlusFlat(BatchNormFolding, SpecialFirstLayerMapComposite):
    """Flat on the first linear layer, fused z-plus on convolutions, fused epsilon on Linear.
    """

    def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=None, first_map=None, zero_params=None,
                 canonizers=None):
        conv_rule = ZPlus(stabilizer=stabilizer, zero_params=zero_params)
        first_map = list(first_map or []) + [(Linear, Flat(stabilizer=stabilizer, zero_params=zero_params))]
        super().__init__(layer_map=_layer_map(layer_map, stabilizer, conv_rule, epsilon, zero_params),
                         first_map=first_map, canonizers=canonizers)


@shared_parameters('composite_epsilon', 'composite_stabilizer', 'layer_map', 'first_map', 'composite_zero_params',
                   'canonizers')
class EpsilonAlpha2Beta1Flat(BatchNormFolding, SpecialFirstLayerMapComposite):
    """Flat on the first linear layer, fused alpha2-beta1 on convolutions, fused epsilon on Linear.
    """

    def __init__(self, epsilon=1e-6, stabilizer=1e-6, layer_map=None, first_map=None, zero_params=None,
                 canonizers=None):
        conv_rule = AlphaBeta(alpha=2, beta=1, stabilizer=stabilizer, zero_params=zero_params)
        first_map = list(first_map or []) + [(Linear, Flat(stabilizer=stabilizer, zero_params=zero_params))]
        super().__init__(layer_map=_layer_map(layer_map, stabilizer, conv_rule, epsilon, zero_params),
                         first_map=first_map, canonizers=canonizers)


# zennit's registry names of the composites lxt_ext has under the same name.
ZENNIT_NAMES = {
    'epsilon_gamma_box': EpsilonGammaBox,
    'epsilon_plus': EpsilonPlus,
    'epsilon_alpha2_beta1': EpsilonAlpha2Beta1,
    'epsilon_plus_flat': EpsilonPlusFlat,
    'epsilon_alpha2_beta1_flat': EpsilonAlpha2Beta1Flat,
}


class ZennitRegistryOverride:
    """zennit's registry names (``zennit.composites.COMPOSITES['epsilon_gamma_box']``, ...) pointing at
    lxt_ext's composites while in effect: from ``apply()`` (or entering a ``with`` block) to
    ``restore()`` (or leaving it), which puts back what the names pointed at before."""

    def __init__(self):
        self._previous = None

    def apply(self):
        if self._previous is None:
            self._previous = {name: COMPOSITES.get(name) for name in ZENNIT_NAMES}
            COMPOSITES.update(ZENNIT_NAMES)
        return self

    def restore(self):
        if self._previous is None:
            return
        for name, composite in self._previous.items():
            if composite is None:
                COMPOSITES.pop(name, None)
            else:
                COMPOSITES[name] = composite
        self._previous = None

    def __enter__(self):
        return self.apply()

    def __exit__(self, *exc):
        self.restore()
        return False


def use_in_zennit_registry():
    """Point zennit's own registry names at lxt_ext's composites, for code that picks composites by name
    (zennit's example scripts: ``COMPOSITES[args.composite](...)``): one added line gives it the fused
    rules, with zennit's names, and so zennit's arguments (``low``/``high`` for ``epsilon_gamma_box``).

    Returns
    -------
    ZennitRegistryOverride
        The override in effect: ``restore()`` (or leaving its ``with`` block) puts back what zennit's
        names pointed at before.

    Examples
    --------
    .. code-block:: python

        lxt_ext.composites.use_in_zennit_registry()            # until .restore()
        with lxt_ext.composites.use_in_zennit_registry(): ...  # or for a block
    """
    return ZennitRegistryOverride().apply()

