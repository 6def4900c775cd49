"""Gamma search for ``ViTGamma``: every (conv gamma, linear gamma) pair of a grid evaluated by perturbation
faithfulness on a data set, the best pair by mean ABPC, and the grid of heatmaps of one image (LXT's ViT
tutorial: conv gammas 0.1, 0.25, 100 by linear gammas 0, 0.01, 0.05, 0.1, 1, a 3 x 5 grid)::

    search = gamma_search(model, images, preprocess=normalise, patch_size=8)
    search.best                     # (conv gamma, linear gamma) of the largest mean ABPC
    save_grid(search, 'gammas.png', image=images[0])
"""
from dataclasses import dataclass

import torch

from .compare import compare, lrp_method

__all__ = ['CONV_GAMMAS', 'LINEAR_GAMMAS', 'GammaSearch', 'gamma_search', 'grid_methods', 'save_grid']

CONV_GAMMAS = (0.1, 0.25, 100.)
LINEAR_GAMMAS = (0., 0.01, 0.05, 0.1, 1.)


@dataclass
class GammaSearch:
    """The result of :func:`gamma_search`.

    Parameters
    ----------
    conv_gammas, linear_gammas : tuple of float
        The grid's axes.
    attention : str
        The attention rule of every ``ViTGamma`` of the grid.
    abpc : torch.Tensor
        (conv, linear) mean ABPC over the images.
    heatmaps : torch.Tensor
        (conv, linear, H, W) relevance of the first image.
    results : list of MethodResult
        Every pair's results, conv-major.
    """
    conv_gammas: tuple
    linear_gammas: tuple
    attention: str
    abpc: torch.Tensor        # (conv, linear) mean ABPC over the images
    heatmaps: torch.Tensor    # (conv, linear, H, W) relevance of the first image
    results: list             # the MethodResult of every pair, conv-major

    @property
    def best(self):
        """The (conv gamma, linear gamma) pair of the largest mean ABPC (the first of equals).

        Returns
        -------
        tuple of float
            ``(conv_gamma, linear_gamma)``.
        """
        index = int(torch.nan_to_num(self.abpc, nan=-float('inf')).flatten().argmax())
        return self.conv_gammas[index // len(self.linear_gammas)], self.linear_gammas[index % len(self.linear_gammas)]

    @classmethod
    def of(cls, conv_gammas, linear_gammas, attention, results):
        """The search of the grid's ``results`` (one per pair, conv-major, as :func:`grid_methods` orders them).

        Parameters
        ----------
        conv_gammas, linear_gammas : sequence of float
            The grid's axes.
        attention : str
            The attention rule.
        results : list of MethodResult
            One per pair.

        Returns
        -------
        GammaSearch
            Mean ABPC and the first image's heatmap per pair.
        """
        shape = (len(conv_gammas), len(linear_gammas))
        abpc = torch.tensor([r.summary()['abpc'] for r in results]).view(shape)
        heatmaps = torch.stack([r.example for r in results]).view(*shape, *results[0].example.shape)
        return cls(tuple(conv_gammas), tuple(linear_gammas), attention, abpc, heatmaps, results)


def gamma_search(model, images, conv_gammas=CONV_GAMMAS, linear_gammas=LINEAR_GAMMAS, attention='cp', **options):
    """:class:`GammaSearch` of ``ViTGamma(conv_gamma, linear_gamma, attention=attention)`` over the grid on
    ``images``; ``options`` go to :func:`lxt_ext.evaluation.compare.compare` (masks, target,
    preprocess, batch size, perturbation settings).

    Parameters
    ----------
    model : torch.nn.Module
        A Vision Transformer that ``ViTGamma`` maps.
    images : torch.Tensor
        (N, C, H, W), before any ``preprocess`` in ``options``.
    conv_gammas : sequence of float, optional
        The gammas of the patch embedding (default ``CONV_GAMMAS``).
    linear_gammas : sequence of float, optional
        The gammas of the Linear layers (default ``LINEAR_GAMMAS``).
    attention : {'cp', 'attnlrp'}, optional
        The attention rule (default ``'cp'``, LXT's ViT recipe).
    **options
        Passed to :func:`lxt_ext.evaluation.compare.compare`.

    Returns
    -------
    GammaSearch
        Mean ABPC and the first image's heatmap per pair; ``.best`` is the pair of the largest ABPC.
    """
    results = compare(model, images, grid_methods(conv_gammas, linear_gammas, attention, options.get('forward')),
                      **options)
    return GammaSearch.of(conv_gammas, linear_gammas, attention, results)


def grid_methods(conv_gammas=CONV_GAMMAS, linear_gammas=LINEAR_GAMMAS, attention='cp', forward=None):
    """The grid's methods, conv-major: ``'conv <g>, linear <g>'`` -> ``method(model, x, target)`` of
    ``ViTGamma(conv_gamma, linear_gamma, attention=attention)``.

    Parameters
    ----------
    conv_gammas, linear_gammas : sequence of float, optional
        The grid's axes (non-negative).
    attention : {'cp', 'attnlrp'}, optional
        The attention rule.
    forward : callable, optional
        ``forward(model, x) -> logits``.

    Returns
    -------
    dict
        Name -> method, in the order ``GammaSearch.of`` expects.
    """
    from ..composites import ViTGamma

    if not conv_gammas or not linear_gammas:
        raise ValueError('give at least one conv gamma and one linear gamma')
    if any(g < 0 for g in (*conv_gammas, *linear_gammas)):
        raise ValueError(f'gammas must be non-negative, got conv {conv_gammas} and linear {linear_gammas}')
    methods = {}
    for conv in conv_gammas:
        for linear in linear_gammas:
            methods[f'conv {conv:g}, linear {linear:g}'] = lrp_method(
                lambda conv=conv, linear=linear: ViTGamma(conv_gamma=conv, linear_gamma=linear, attention=attention),
                forward=forward)
    return methods


def save_grid(search, path, image=None):
    """A PNG of the heatmaps, one row per conv gamma and one column per linear gamma, each titled with
    its mean ABPC, the best pair framed; ``image`` (3, H, W) in 0..1 shown in an extra first column.

    Parameters
    ----------
    search : GammaSearch
        What :func:`gamma_search` returned.
    path : str
        The PNG file to write.
    image : torch.Tensor, optional
        (3, H, W) in 0..1, shown in an extra first column.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from ..visualization.image import colours

    rows, columns = search.abpc.shape
    extra = image is not None
    figure, axes = plt.subplots(rows, columns + extra, figsize=(2.2 * (columns + extra), 2.4 * rows), squeeze=False)
    best = search.best
    for i, conv in enumerate(search.conv_gammas):
        if extra:
            axes[i, 0].imshow(image.permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            axes[i, 0].set_title('image', fontsize=8)
            axes[i, 0].axis('off')
        for j, linear in enumerate(search.linear_gammas):
            ax = axes[i, j + extra]
            ax.imshow(colours(search.heatmaps[i, j]).clip(0, 1))
            ax.set_title(f'conv {conv:g}, linear {linear:g}\nABPC {float(search.abpc[i, j]):.3g}', fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if (conv, linear) == best:
                for spine in ax.spines.values():
                    spine.set_edgecolor('lime')
                    spine.set_linewidth(3)
            else:
                ax.axis('off')
    figure.suptitle(f'ViTGamma ({search.attention}) gamma search: best conv {best[0]:g}, linear {best[1]:g}',
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
