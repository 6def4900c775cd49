"""Attribution methods by name, as the command line spells them: ``vit_gamma:cp,gradient,...``.

A method spec is either an LRP composite of :data:`lxt_ext.cli.models.COMPOSITES` (the image composites
of ``lxt_ext.composites.NAMES``), for the ``vit_*`` composites optionally with the attention rule after
a colon (``vit_gamma:cp``, ``vit_epsilon:attnlrp``), or one of the :data:`BASELINES` of
``lxt_ext.attribution.baselines``. Each spec becomes a ``method(model, x, target) -> relevance`` shaped
like ``x``, the form ``lxt_ext.evaluation.compare`` takes; ``lxt-ext evaluate`` and ``lxt-ext demo``
both build their methods here.
"""
from .models import COMPOSITES, build_composite

BASELINES = ('gradient', 'gradient_x_input', 'integrated_gradients', 'smoothgrad', 'attention_rollout')
DEFAULT_VIT_METHODS = ('vit_epsilon:attnlrp', 'vit_epsilon:cp', 'vit_gamma:attnlrp', 'vit_gamma:cp') + BASELINES
# attention_rollout needs attention layers, so it is no CNN default
DEFAULT_CNN_METHODS = ('epsilon_gamma_box', 'epsilon_plus', 'gradient', 'gradient_x_input', 'integrated_gradients',
                       'smoothgrad')


def baseline(name, forward=None):
    """The baseline ``name`` of ``lxt_ext.attribution.baselines`` as a method.

    Parameters
    ----------
    name : str
        One of :data:`BASELINES`.
    forward : callable, optional
        ``forward(model, x) -> logits`` (default ``model(x)``), e.g. a Hugging Face model's.

    Returns
    -------
    callable
        ``method(model, x, target)``: the baseline's relevance shaped like ``x``, through ``forward``.

    Raises
    ------
    ValueError
        When ``name`` is no baseline.
    """
    from ..attribution import baselines

    if name not in BASELINES:
        raise ValueError(f'unknown baseline {name!r}: give one of {list(BASELINES)}')
    function = getattr(baselines, name)

    def method(model, x, target):
        return function(model, x, target, forward=forward)
    return method


def composite(spec, loaded):
    """The LRP composite of ``spec`` (``name`` or ``name:attention``) on ``loaded`` as a method.

    The composite is built once here, so that one which does not fit the model (a CNN composite for a
    transformer, an attention rule for a CNN composite) is refused before any image is explained; the
    method builds a fresh one per call, since a composite holds hooks of one registration at a time.

    Parameters
    ----------
    spec : str
        A composite of :data:`lxt_ext.cli.models.COMPOSITES`, for ``vit_*`` optionally followed by
        ``:attnlrp`` or ``:cp``.
    loaded : lxt_ext.cli.models.LoadedModel
        The model the composite explains (its kind, canonizer and input bounds shape the composite).

    Returns
    -------
    callable
        ``method(model, x, target)``: the relevance of a fresh composite per call, shaped like ``x``.

    Raises
    ------
    ValueError
        Naming ``spec``, when the composite does not fit ``loaded``, takes no attention rule or not this
        one.
    """
    from ..evaluation.compare import lrp_method

    name, _, attention = spec.partition(':')
    parameters = {'attention': attention} if attention else {}
    try:
        build_composite(name, loaded, parameters)
    except ValueError as error:
        # with several methods given, the composite's own message may not say which spec it refuses
        raise ValueError(f'method {spec!r}: {error}') from None
    return lrp_method(lambda: build_composite(name, loaded, parameters)[0], forward=loaded.forward)


def build(specs, loaded):
    """The methods of ``specs``, in their order.

    Parameters
    ----------
    specs : iterable of str
        Method specs (see the module doc).
    loaded : lxt_ext.cli.models.LoadedModel
        The model the methods explain.

    Returns
    -------
    dict
        ``{spec: method(model, x, target) -> relevance}``.

    Raises
    ------
    ValueError
        Naming the first spec that is neither a composite nor a baseline, or a composite that does not
        fit ``loaded``.
    """
    methods = {}
    for spec in specs:
        if spec in BASELINES:
            methods[spec] = baseline(spec, forward=loaded.forward)
        elif spec.partition(':')[0] in COMPOSITES:
            methods[spec] = composite(spec, loaded)
        else:
            raise ValueError(f'unknown method {spec!r}: give composites {sorted(COMPOSITES)} (vit_*:attnlrp|cp) or '
                             f'baselines {list(BASELINES)}')
    return methods


def parse(text, loaded):
    """The methods of a comma-separated list of specs, as ``--methods`` gives them.

    Parameters
    ----------
    text : str or None
        E.g. ``'vit_gamma:cp,gradient'`` (blanks and empty entries are ignored); None or empty for the
        defaults of the model's kind, :data:`DEFAULT_VIT_METHODS` or :data:`DEFAULT_CNN_METHODS`.
    loaded : lxt_ext.cli.models.LoadedModel
        The model the methods explain.

    Returns
    -------
    dict
        ``{spec: method(model, x, target) -> relevance}``, in the order of ``text``.

    Raises
    ------
    ValueError
        As :func:`build`.
    """
    if not text:
        return build(DEFAULT_VIT_METHODS if loaded.transformer else DEFAULT_CNN_METHODS, loaded)
    return build([spec.strip() for spec in text.split(',') if spec.strip()], loaded)
