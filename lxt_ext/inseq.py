"""lxt_ext's AttnLRP and CP-LRP as `inseq <https://github.com/inseq-team/inseq>`_ feature attribution methods.

Importing this module registers two inseq methods, ``'attnlrp'`` (:class:`AttnLRPAttribution`) and ``'cp_lrp'``
(:class:`CPLRPAttribution`); inseq's generation loop, outputs (``FeatureAttributionOutput``, ``.show()``,
aggregation, saving) and step scores then work as with its own methods::

    import inseq
    import lxt_ext.inseq  # registers 'attnlrp' and 'cp_lrp'

    model = inseq.load_model(hf_model, 'attnlrp', tokenizer=tokenizer)   # or 'cp_lrp'
    out = model.attribute('The cat sat', generated_texts='The cat sat on the mat', attributed_fn='logit')
    out.show()
    out.sequence_attributions[0].target_attributions   # (tokens, generated tokens): token relevance per step

Each generation step is Captum's input x gradient with ``lxt_ext.composites.LanguageTransformer`` registered on
the model for that step only (removed after it, nothing left on the model). The output seed follows LXT: the
gradient of inseq's attributed function at the logits, times the logits (what LXT's Gradient x Input rules
give for ``f(logits).backward()``), so ``attributed_fn='logit'`` gives relevance summing to the logit, as
``lxt_ext.attribution.generation.explain_generation`` with ``target='logit'``; ``'probability'`` (inseq's
default) and ``'probability'`` with ``attributed_fn_args={'logprob': True}`` (LXT's ``'log_prob'``) are the
other functions supported; any other attributed function (contrastive ones, which run a second forward,
entropy, custom ones) is refused with a ``ValueError``.

The attributions are token relevance (``x * grad`` summed over the embedding dimension, as LRP reads it):
inseq's token-level ("coarse") outputs, which it shows as they are (no L2 norm over the embedding and no
normalisation, unlike its gradient methods' default aggregation).

Needs inseq 0.7.1, whose declared dependencies include CUDA 11 wheels; install it without them:
``pip install --no-deps -r requirements-inseq.txt`` (from a checkout) or
``pip install --no-deps inseq==0.7.1 jaxtyping typeguard==2.13.3 treescope wadler-lindig``.
"""
try:
    from captum.attr import InputXGradient
    from inseq.attr.feat.attribution_utils import get_source_target_attributions
    from inseq.attr.feat.gradient_attribution import GradientAttributionRegistry
    from inseq.attr.step_functions import logit_fn, probability_fn
    from inseq.data import CoarseFeatureAttributionStepOutput
except ImportError as error:
    raise ImportError(
        f'lxt_ext.inseq needs inseq 0.7.1 ({error}); install it without its CUDA 11 dependencies: '
        'pip install --no-deps -r requirements-inseq.txt (in a checkout of lxt_ext), or '
        'pip install --no-deps inseq==0.7.1 jaxtyping typeguard==2.13.3 treescope wadler-lindig') from error

from .attribution.explainer import frozen_parameters
from .composites import LanguageTransformer
from .transformer.convention import times_input

__all__ = ['AttnLRPAttribution', 'CPLRPAttribution', 'SUPPORTED_ATTRIBUTED_FNS']

#: inseq's attributed functions (``attributed_fn``) the LRP methods explain; ``'probability'`` also with
#: ``attributed_fn_args={'logprob': True}``.
SUPPORTED_ATTRIBUTED_FNS = ('logit', 'probability')
_SUPPORTED = {logit_fn: 'logit', probability_fn: 'probability'}


def _seed_as_relevance(module, args, output):
    """Forward hook: the gradient arriving at the logits leaves multiplied by them (LXT's seed: relevance
    ``z * df/dz``, which the composite's output conversion reads as relevance)."""
    output['logits'] = times_input(output['logits'])
    return output


class AttnLRPAttribution(GradientAttributionRegistry):
    """inseq's ``'attnlrp'`` method: ``LanguageTransformer(attention='attnlrp')`` relevance of each generation step.

    Parameters
    ----------
    attribution_model : inseq.models.AttributionModel
        The model inseq attributes (``inseq.load_model`` passes it).
    **composite_options
        Options of ``lxt_ext.composites.LanguageTransformer`` other than ``attention`` (``epsilon``, ``gamma``,
        ``stabilizer``, ``layer_map``, ``strict``, ``tables``); ``inseq.load_model`` passes its extra keyword
        arguments here.
    """

    method_name = 'attnlrp'
    attention = 'attnlrp'

    def __init__(self, attribution_model, **composite_options):
        super().__init__(attribution_model)
        self.composite = LanguageTransformer(attention=self.attention, **composite_options)
        self.method = InputXGradient(self.attribution_model)

    def attribute(self, batch, attributed_fn, *args, **kwargs):
        """inseq's attribution loop, for the supported attributed functions only.

        Parameters
        ----------
        batch : inseq.data.DecoderOnlyBatch or inseq.data.EncoderDecoderBatch
            The batch to attribute.
        attributed_fn : callable
            inseq's step function to explain (one of :data:`SUPPORTED_ATTRIBUTED_FNS`).
        *args
            inseq's other arguments of ``FeatureAttribution.attribute``.
        **kwargs
            inseq's other arguments of ``FeatureAttribution.attribute``.

        Returns
        -------
        inseq.FeatureAttributionOutput
        """
        if attributed_fn not in _SUPPORTED:
            name = getattr(attributed_fn, '__name__', repr(attributed_fn))
            raise ValueError(f'the {self.method_name!r} method explains inseq\'s attributed functions '
                             f'{SUPPORTED_ATTRIBUTED_FNS} (\'probability\' also with attributed_fn_args='
                             f'{{"logprob": True}}), got {name}')
        return super().attribute(batch, attributed_fn, *args, **kwargs)

    def attribute_step(self, attribute_fn_main_args, attribution_args={}):
        """One generation step: input x gradient with the composite registered, token relevance out.

        Parameters
        ----------
        attribute_fn_main_args : dict
            Captum's ``inputs`` and ``additional_forward_args`` of this step (built by inseq).
        attribution_args : dict
            Further arguments of Captum's ``InputXGradient.attribute``.

        Returns
        -------
        inseq.data.CoarseFeatureAttributionStepOutput
            Relevance ``(batch, tokens)`` of the source and (or) target tokens.
        """
        model = self.attribution_model.model
        seed = model.register_forward_hook(_seed_as_relevance)
        try:
            with frozen_parameters(model):
                self.composite.register(model)
                attributions = self.method.attribute(**attribute_fn_main_args, **attribution_args)
        finally:
            self.composite.remove()
            seed.remove()
        source, target = get_source_target_attributions(attributions, self.attribution_model.is_encoder_decoder)
        return CoarseFeatureAttributionStepOutput(
            source_attributions=None if source is None else source.sum(-1),
            target_attributions=None if target is None else target.sum(-1))


class CPLRPAttribution(AttnLRPAttribution):
    """inseq's ``'cp_lrp'`` method: ``LanguageTransformer(attention='cp')`` relevance of each generation step.

    Parameters
    ----------
    attribution_model : inseq.models.AttributionModel
        The model inseq attributes (``inseq.load_model`` passes it).
    **composite_options
        Options of ``lxt_ext.composites.LanguageTransformer`` other than ``attention``.
    """

    method_name = 'cp_lrp'
    attention = 'cp'
