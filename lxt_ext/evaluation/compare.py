"""Several attribution methods on one data set, side by side: perturbation faithfulness (ABPC, MoRF and
LeRF areas), localisation against masks (relevance mass accuracy, pointing game) and the attribution
time per image (after one untimed warm-up call of each method), with a markdown table, a JSON record
and a PNG of the curves and example heatmaps.

A method is ``method(model, x, target) -> relevance shaped like x`` (the baselines of
``lxt_ext.attribution.baselines`` are such functions; :func:`lrp_method` makes one of an LRP composite). Every
method explains the same classes: ``target`` (e.g. the labels) or, by default, each image's
predicted class. Perturbation acts on the model's input (after ``preprocess``, e.g. normalisation, so
``fill='zeros'`` is the data set's mean colour for a normalised model)::

    results = compare(model, images, {'AttnLRP': lrp_method(lambda: ViTEpsilon()),
                                      'gradient x input': gradient_x_input}, masks=masks,
                      preprocess=lambda im: (im - MEAN) / STD, patch_size=8)
    print(markdown_table(results)); save_plot(results, 'evaluation.png', images[0])
"""
import json
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..attribution import explain_batch, logits_of
from .._docstrings import shared_parameters
from .localization import pointing_game, relevance_mass_accuracy
from .perturbation import _OPTIONS, Faithfulness, faithfulness
from .statistics import bootstrap_band

__all__ = ['MethodResult', 'lrp_method', 'compare', 'markdown_table', 'results_json', 'save_plot']


def lrp_method(make_composite, forward=None):
    """``method(model, x, target)`` of the LRP composite ``make_composite()`` (a fresh one per call)
    through :func:`lxt_ext.attribution.explain_batch`.

    Parameters
    ----------
    make_composite : callable
        ``make_composite()`` gives a new composite (e.g. ``lambda: ViTEpsilon()``).
    forward : callable, optional
        ``forward(model, x) -> logits`` (default ``model(x)``).

    Returns
    -------
    callable
        ``method(model, x, target) -> relevance`` shaped like ``x``.
    """
    def method(model, x, target):
        return explain_batch(model, x, make_composite(), target=target, forward=forward).relevance
    return method


@dataclass
class MethodResult:
    """One method's per-image results (tensors over the N images, curves (N, S + 1)).

    Parameters
    ----------
    name : str
        The method's name.
    mode : str
        The perturbation mode, ``'deletion'`` or ``'insertion'``.
    morf, lerf : torch.Tensor
        The MoRF and LeRF curves (N, S + 1).
    abpc, morf_area, lerf_area : torch.Tensor
        Per image (N,).
    seconds : float
        The attribution time over all images.
    relevance_mass, pointing_game : torch.Tensor, optional
        Per image (N,); None without masks.
    example : torch.Tensor, optional
        The first image's relevance summed over channels (H, W).
    """
    name: str
    mode: str
    morf: torch.Tensor
    lerf: torch.Tensor
    abpc: torch.Tensor
    morf_area: torch.Tensor
    lerf_area: torch.Tensor
    seconds: float                                   # attribution time over all images
    relevance_mass: torch.Tensor = None              # None without masks
    pointing_game: torch.Tensor = None
    example: torch.Tensor = field(default=None, repr=False)  # the first image's relevance (H, W)

    @property
    def images(self):
        return self.abpc.shape[0]

    def summary(self):
        """Means over the images (NaN-free means for the localisation scores), and the standard error of
        the mean ABPC (sample standard deviation / sqrt(N); 0 for one image).

        Returns
        -------
        dict
            ``abpc``, ``abpc_sem``, ``morf_area``, ``lerf_area``, ``relevance_mass``, ``pointing_game``
            (None without masks), ``seconds_per_image`` and ``images``.
        """
        mean = lambda t: None if t is None else float(t.nanmean())  # noqa: E731
        sem = float(self.abpc.std() / self.images ** 0.5) if self.images > 1 else 0.
        return {'abpc': mean(self.abpc), 'abpc_sem': sem, 'morf_area': mean(self.morf_area),
                'lerf_area': mean(self.lerf_area), 'relevance_mass': mean(self.relevance_mass),
                'pointing_game': mean(self.pointing_game), 'seconds_per_image': self.seconds / self.images,
                'images': self.images}


def _sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


@shared_parameters('perturbed_model', leading=True)
@shared_parameters('logits_forward', 'progress', *_OPTIONS)
def compare(model, images, methods, masks=None, target=None, preprocess=None, batch_size=8, forward=None,
            progress=True, mode='deletion', unit='patch', patch_size=16, fill='zeros', units_per_step=1,
            max_steps=None):
    """:class:`MethodResult` per method (a dict name -> method) on ``images`` (N, C, H, W) on the model's
    device, in batches of ``batch_size``; ``masks`` (N, H, W) bool for the localisation scores;
    perturbation arguments as in :func:`lxt_ext.evaluation.faithfulness`.

    Parameters
    ----------
    images : torch.Tensor
        (N, C, H, W), before ``preprocess``.
    methods : dict
        Name -> ``method(model, x, target) -> relevance`` shaped like ``x``.
    masks : torch.Tensor, optional
        (N, H, W) bool, True on the object: adds relevance mass accuracy and the pointing game.
    target : int or torch.Tensor, optional
        The classes to explain, one per image or one for all (default: each image's predicted class).
    preprocess : callable, optional
        Applied to each batch before the model (e.g. normalisation); perturbation acts after it.
    batch_size : int, optional
        Images per batch (default 8).

    Returns
    -------
    list of MethodResult
        One per method, in the order of ``methods``.
    """
    if not methods:
        raise ValueError('no methods to compare')
    if masks is not None and masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f'masks must be (N, H, W) = {(images.shape[0], *images.shape[2:])}, got {tuple(masks.shape)}')
    n = images.shape[0]
    if target is not None:
        target = torch.as_tensor(target).long()
        target = target.expand(n) if target.dim() == 0 else target
        if target.shape != (n,):
            raise ValueError(f'target must be one class per image ({n}), got shape {tuple(target.shape)}')
    device = next(model.parameters()).device
    call = forward or (lambda model, x: model(x))
    collected = {name: {'morf': [], 'lerf': [], 'mass': [], 'pointing': [], 'seconds': 0., 'example': None}
                 for name in methods}
    warm = images[:1].to(device)
    warm = preprocess(warm) if preprocess is not None else warm
    with torch.no_grad():
        warm_target = logits_of(call(model, warm)).argmax(1)
    for method in methods.values():  # first calls pay one-time costs (registration paths, allocator): untimed
        method(model, warm, warm_target)
    bar = tqdm(total=len(methods) * -(-n // batch_size), desc='evaluating', disable=not progress)
    for start in range(0, n, batch_size):
        batch = images[start:start + batch_size].to(device)
        x = preprocess(batch) if preprocess is not None else batch
        if target is None:
            with torch.no_grad():
                batch_target = logits_of(call(model, x)).argmax(1)
        else:
            batch_target = target[start:start + batch_size].to(device)
        for name, method in methods.items():
            bar.set_postfix_str(name)
            _sync(device)
            began = time.perf_counter()
            relevance = method(model, x, batch_target)
            _sync(device)
            record = collected[name]
            record['seconds'] += time.perf_counter() - began
            if relevance.shape != x.shape:
                raise ValueError(f'method {name!r} returned relevance of shape {tuple(relevance.shape)} for an '
                                 f'input of shape {tuple(x.shape)}')
            result = faithfulness(model, x, relevance, batch_target, mode=mode, unit=unit, patch_size=patch_size,
                                  fill=fill, units_per_step=units_per_step, max_steps=max_steps, forward=forward,
                                  progress=False)
            record['morf'].append(result.morf.cpu())
            record['lerf'].append(result.lerf.cpu())
            if masks is not None:
                mask = masks[start:start + batch_size].to(relevance.device)
                record['mass'].append(relevance_mass_accuracy(relevance, mask).cpu())
                record['pointing'].append(pointing_game(relevance, mask).cpu())
            if record['example'] is None:
                record['example'] = relevance[0].detach().sum(0).cpu()
            bar.update()
    bar.close()
    results = []
    for name, record in collected.items():
        whole = Faithfulness(mode, torch.cat(record['morf']), torch.cat(record['lerf']))
        results.append(MethodResult(
            name, mode, whole.morf, whole.lerf, whole.abpc, whole.morf_area, whole.lerf_area, record['seconds'],
            torch.cat(record['mass']) if record['mass'] else None,
            torch.cat(record['pointing']) if record['pointing'] else None, record['example']))
    return results


def markdown_table(results):
    """The results as a markdown table, one row per method (means over the images).

    Parameters
    ----------
    results : list of MethodResult
        What :func:`compare` returned.

    Returns
    -------
    str
        The table (ABPC with its standard error, areas, localisation scores, seconds per image).
    """
    lines = ['| method | ABPC (± s.e.m.) | MoRF area | LeRF area | relevance mass | pointing game | s / image |',
             '|---|---:|---:|---:|---:|---:|---:|']
    fmt = lambda v, spec: 'n/a' if v is None else format(v, spec)  # noqa: E731
    for r in results:
        s = r.summary()
        lines.append(f"| {r.name} | {s['abpc']:.4g} ± {s['abpc_sem']:.2g} | {fmt(s['morf_area'], '.4g')} | "
                     f"{fmt(s['lerf_area'], '.4g')} | {fmt(s['relevance_mass'], '.3f')} | "
                     f"{fmt(s['pointing_game'], '.3f')} | {s['seconds_per_image']:.3g} |")
    return '\n'.join(lines)


def results_json(results, settings=None):
    """A JSON-ready dict: the settings, and per method its means, per-image scores and mean curves.

    Parameters
    ----------
    results : list of MethodResult
        What :func:`compare` returned.
    settings : dict, optional
        Recorded as given under ``'settings'``.

    Returns
    -------
    dict
        ``{'settings': ..., 'methods': {name: {means..., 'per_image': ..., 'mean_curve': ...}}}``.
    """
    record = {'settings': settings or {}, 'methods': {}}
    for r in results:
        listed = lambda t: None if t is None else [None if v != v else v for v in t.tolist()]  # noqa: E731
        record['methods'][r.name] = {
            **r.summary(),
            'per_image': {'abpc': listed(r.abpc), 'morf_area': listed(r.morf_area), 'lerf_area': listed(r.lerf_area),
                          'relevance_mass': listed(r.relevance_mass), 'pointing_game': listed(r.pointing_game)},
            'mean_curve': {'morf': r.morf.mean(0).tolist(), 'lerf': r.lerf.mean(0).tolist()},
        }
    json.dumps(record)  # fail here, not in the caller's file, if something is not serialisable
    return record


def save_plot(results, path, image=None, title=None, band=None):
    """A PNG: the mean MoRF (solid) and LeRF (dashed) curves of every method over the fraction of units
    perturbed (with ``band``, each in its pointwise bootstrap band), and below them each method's heatmap of
    the first image (``image`` (3, H, W) in 0..1, if given, shown first).

    Parameters
    ----------
    results : list of MethodResult
        What :func:`compare` returned.
    path : str
        The PNG file to write.
    image : torch.Tensor, optional
        (3, H, W) in 0..1, shown before the heatmaps.
    title : str, optional
        The figure's title.
    band : float, optional
        Shade each mean curve's pointwise percentile-bootstrap band of this confidence (e.g. 0.95;
        :func:`lxt_ext.evaluation.statistics.bootstrap_band`).
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    from ..visualization.image import colours

    count = len(results)
    columns = max(count + (image is not None), 1)
    figure = plt.figure(figsize=(max(8, 2.2 * columns), 8.5))
    grid = figure.add_gridspec(2, columns, height_ratios=(2.2, 1))
    axes = figure.add_subplot(grid[0, :])
    palette = plt.get_cmap('tab10')
    for i, r in enumerate(results):
        steps = r.morf.shape[1] - 1
        fraction = torch.arange(steps + 1) / steps
        s = r.summary()
        axes.plot(fraction, r.morf.mean(0), color=palette(i % 10), label=f"{r.name} (ABPC {s['abpc']:.3g})")
        axes.plot(fraction, r.lerf.mean(0), color=palette(i % 10), linestyle='--')
        if band:
            for curves in (r.morf, r.lerf):
                low, high = bootstrap_band(curves, confidence=band)
                axes.fill_between(fraction, low, high, color=palette(i % 10), alpha=0.15, linewidth=0)
    mode = results[0].mode
    axes.set_xlabel(f'fraction of units {"deleted" if mode == "deletion" else "inserted"} '
                    f'(solid: most relevant first, dashed: least relevant first)')
    axes.set_ylabel('explained logit (mean over images' + (f', {band * 100:g} % bands)' if band else ')'))
    axes.set_title(title or f'{mode} curves')
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc='best')
    panels = [('image', image.permute(1, 2, 0).clamp(0, 1).cpu().numpy())] if image is not None else []
    for r in results:
        # a map without negative values (rollout) would be all hot: its minimum is taken off for contrast
        shifted = r.example.min() >= 0
        panels.append((r.name + (' (- min)' if shifted else ''),
                       colours(r.example - r.example.min() if shifted else r.example).clip(0, 1)))
    for i, (name, picture) in enumerate(panels):
        ax = figure.add_subplot(grid[1, i])
        ax.imshow(picture)
        ax.set_title(name, fontsize=8)
        ax.axis('off')
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
