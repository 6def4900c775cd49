"""The perturbation protocols of the papers, by name: the settings of :func:`lxt_ext.evaluation.faithfulness`
(and of ``lxt-ext evaluate --protocol``) that each paper's faithfulness figures used.

``'attnlrp'``
    The AttnLRP paper (Achtibat et al., ICML 2024), as its authors describe it in LXT issue #40: the
    input's patches (images) or token embeddings (text) are zeroed most-relevant-first (MoRF) and
    least-relevant-first (LeRF), one unit per step, the true class's logit is recorded, and the score is
    the area between the two curves (ABPC). The model's own patch size is the unit. This is also the
    primary protocol of ``lxt-ext evaluate`` at scale.
``'dynamiclrp'``
    DynamicLRP's ViT protocol: occlusion of 4 patches per step with a blurred copy of the image as the
    fill (:func:`lxt_ext.evaluation.blur`, sigma 5 pixels), MoRF and LeRF deletion, the true class's
    logit, ABPC.

Zeroing acts on the normalised input, so on an image model a zeroed patch is the data set's mean colour.
"""
from typing import NamedTuple

__all__ = ['Protocol', 'PROTOCOLS']


class Protocol(NamedTuple):
    """The settings of one perturbation protocol.

    Parameters
    ----------
    mode : str
        ``'deletion'`` or ``'insertion'``.
    fill : str
        What replaces a deleted unit (``'zeros'``, ``'mean'``, ``'blur'``).
    units_per_step : int
        Units perturbed per step.
    target : str
        The explained class: ``'label'`` (the true class) or ``'predicted'``.
    description : str
        One line for reports.
    """

    mode: str
    fill: str
    units_per_step: int
    target: str
    description: str


PROTOCOLS = {
    'attnlrp': Protocol('deletion', 'zeros', 1, 'label',
                        'AttnLRP (LXT #40): patches zeroed one per step, MoRF and LeRF, true-class logit, ABPC'),
    'dynamiclrp': Protocol('deletion', 'blur', 4, 'label',
                           'DynamicLRP: 4 patches per step occluded with a blurred image, MoRF and LeRF, '
                           'true-class logit, ABPC'),
}
