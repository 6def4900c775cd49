"""lxt_ext's attribution in Captum's and Quantus's conventions, both over
:func:`lxt_ext.attribution.explain_batch` (one forward, one backward; neither library is imported here).

Captum::

    from captum.metrics import infidelity, sensitivity_max
    lrp = LRP(model, lxt_ext.composites.ViTEpsilon())
    relevance = lrp.attribute(x, target=labels)                 # shaped like x
    infidelity(model, perturb, x, relevance, target=labels)
    sensitivity_max(lrp.attribute, x, target=labels)

Quantus::

    metric(model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=quantus_explain,
           explain_func_kwargs={'composite': lxt_ext.composites.ViTGamma()})
"""
import numpy as np
import torch

from .._docstrings import shared_parameters
from .explainer import explain_batch
from .targets import from_captum

__all__ = ['LRP', 'quantus_explain']


@shared_parameters('attributed_model', leading=True)
class LRP:
    """Captum-style attribution with an LRP composite: ``attribute(inputs, target, additional_forward_args)``.

    Parameters
    ----------
    composite : zennit.core.Composite, optional
        The composite (default None: the plain gradient).
    forward : callable, optional
        ``forward(model, x, *additional_forward_args) -> logits`` (default ``model(x, *args)``).
    """

    def __init__(self, model, composite=None, forward=None):
        self.model = model
        self.composite = composite
        self.forward_func = forward or (lambda model, x, *args: model(x, *args))

    def attribute(self, inputs, target=None, additional_forward_args=None):
        """Relevance shaped like ``inputs`` (a tensor; Captum's tuples of several inputs are refused)."""
        if isinstance(inputs, tuple):
            if len(inputs) != 1:
                raise ValueError(f'LRP attributes one input tensor, got a tuple of {len(inputs)}')
            return (self.attribute(inputs[0], target, additional_forward_args),)
        args = additional_forward_args
        args = () if args is None else tuple(args) if isinstance(args, (tuple, list)) else (args,)
        target = from_captum(target, inputs.shape[0], inputs.device)
        forward = lambda model, x: self.forward_func(model, x, *args)  # noqa: E731
        return explain_batch(self.model, inputs, self.composite, target=target, forward=forward).relevance

    def has_convergence_delta(self):
        return False

    @property
    def multiplies_by_inputs(self):
        """LRP relevance is input-scaled (as gradient x input), except the plain gradient."""
        return self.composite is not None


@shared_parameters('attributed_model', leading=True)
def quantus_explain(model, inputs, targets, composite=None, forward=None, device=None, **kwargs):
    """Quantus's ``explain_func``. Quantus passes ``explain_func_kwargs`` as keywords (``composite``,
    ``forward``, ``device``).

    Parameters
    ----------
    inputs : numpy.ndarray or torch.Tensor
        The input batch (made float32).
    targets : array_like
        One class per row.
    composite : zennit.core.Composite, optional
        The composite (default None: the plain gradient).
    forward : callable, optional
        ``forward(model, x) -> logits`` (default ``model(x)``).
    device : torch.device or str, optional
        Where to compute (default: the device of the model's first parameter).
    **kwargs
        Refused: any other keyword raises ``TypeError`` by name.

    Returns
    -------
    numpy.ndarray
        float32 relevance shaped like ``inputs``.
    """
    if kwargs:
        raise TypeError(f'quantus_explain got unknown keyword arguments {sorted(kwargs)}')
    device = device or next(model.parameters()).device
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs,
                        dtype=torch.float32, device=device)
    target = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets,
                             device=device).long().reshape(-1)
    relevance = explain_batch(model, x, composite, target=target, forward=forward).relevance
    return relevance.detach().cpu().numpy().astype(np.float32)
