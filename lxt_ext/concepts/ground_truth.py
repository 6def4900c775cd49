"""Ground truth for concepts on the embedded model: are the units most relevant to a class labelled by that class
(the purity of their reference samples against random units and random images), and does a unit's relevance
localise on the object (relevance mass of its conditional heatmaps)? What ``lxt-ext concepts`` runs and draws.

The embedded ViT was trained on procedural shapes (:mod:`lxt_ext.data.shapes`) whose classes and object masks are
known. :func:`ground_truth` finds every unit's reference samples among held-out images (relevance maximisation, each
image explained for its label, and activation maximisation, zennit-crp's under lxt_ext's transformer composite),
labels each unit by the majority class of its top ``k`` references with the share carrying it (purity), picks for
each class the units most relevant to it on the shipped demo samples (images disjoint from the references) and
compares their purity with as many random units and with ``k`` random images (chance); then measures the relevance
mass of the units' conditional heatmaps on their references against the unconditional heatmaps and the mask's area.
"""
import tempfile

import torch

from .layers import resolve_layer

__all__ = ['MAX_K', 'class_units', 'random_purity', 'chance_purity', 'conditional_heatmaps', 'localisation',
           'ground_truth']

MAX_K = 40  # zennit-crp's Maximization keeps the 40 best samples per unit


def class_units(model, x, labels, layer, make_composite, per_class, classes):
    """For each class the units most relevant to it on the given samples of that class (their relevance for
    it summed over tokens and the samples: :func:`lxt_ext.concepts.most_relevant_units`).

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    x : torch.Tensor
        ``(N, 3, H, W)`` normalised samples.
    labels : torch.Tensor
        ``(N,)`` their classes (each class present).
    layer : str
        The concept layer.
    make_composite : callable
        Builds the composite.
    per_class : int
        Units per class.
    classes : int
        The number of classes.

    Returns
    -------
    list of list of int
        Per class its units, most relevant first.
    """
    from tqdm import tqdm

    from . import most_relevant_units

    chosen = []
    for c in tqdm(range(classes), desc='units per class', dynamic_ncols=True):
        rows = labels == c
        if not rows.any():
            raise ValueError(f'no selection sample of class {c}')
        top = most_relevant_units(model, x[rows], make_composite(), layer, target=labels[rows], k=per_class)
        chosen.append(top.units.tolist())
    return chosen


def random_purity(purity, count, draws, generator):
    """``(draws,)``: the mean purity of ``count`` units drawn at random (without replacement within a draw).

    Parameters
    ----------
    purity : torch.Tensor
        ``(units,)`` every unit's purity.
    count : int
        Units per draw.
    draws : int
        How many draws.
    generator : torch.Generator
        The random draws' generator.

    Returns
    -------
    torch.Tensor
        ``(draws,)`` float64; and the first draw's units as a second value.
    """
    picks = torch.stack([torch.randperm(len(purity), generator=generator)[:count] for _ in range(draws)])
    return purity.double()[picks].mean(1), picks[0].tolist()


def chance_purity(labels, k, draws, generator, classes):
    """``(draws,)``: the purity of ``k`` images drawn at random (without replacement): the chance level.

    Parameters
    ----------
    labels : torch.Tensor
        ``(N,)`` the images' classes.
    k : int
        Images per draw.
    draws : int
        How many draws.
    generator : torch.Generator
        The random draws' generator.
    classes : int
        The number of classes.

    Returns
    -------
    torch.Tensor
        ``(draws,)`` float64.
    """
    from . import label_units

    picks = torch.stack([torch.randperm(len(labels), generator=generator)[:k] for _ in range(draws)], 1)
    return label_units(picks, labels, num_classes=classes).purity


def conditional_heatmaps(attribution, make_composite, layer, mask_map, x, labels, unit=None, batch_size=50):
    """``(N, H, W)``: each image's heatmap for its label, through ``unit`` of ``layer`` alone (``None``: the
    unconditional class heatmap).

    Parameters
    ----------
    attribution : lxt_ext.concepts.TransformerCondAttribution
        The attribution.
    make_composite : callable
        Builds the composite.
    layer : str
        The concept layer.
    mask_map : dict
        zennit-crp's ``mask_map`` (the layers' concepts' masks).
    x : torch.Tensor
        ``(N, 3, H, W)`` normalised images.
    labels : torch.Tensor
        ``(N,)`` the classes explained.
    unit : int, optional
        The unit conditioned on.
    batch_size : int, optional
        Images per backward.

    Returns
    -------
    torch.Tensor
    """
    heatmaps = []
    for start in range(0, len(x), batch_size):
        rows = slice(start, start + batch_size)
        conditions = [{'y': [int(label)], **({layer: [int(unit)]} if unit is not None else {})}
                      for label in labels[rows]]
        result = attribution(x[rows].clone().requires_grad_(), conditions, make_composite(), mask_map=mask_map)
        heatmaps.append(result.heatmap.detach())
    return torch.cat(heatmaps)


def localisation(heatmaps, unconditional, masks):
    """The relevance mass (share of positive relevance inside the mask) of conditional and unconditional
    heatmaps of the same images, and the mask's area share (chance level).

    Parameters
    ----------
    heatmaps, unconditional : torch.Tensor
        ``(N, H, W)`` a unit's conditional heatmaps and the class heatmaps.
    masks : torch.Tensor
        ``(N, H, W)`` bool.

    Returns
    -------
    dict
        ``conditional``, ``unconditional``, ``area``: ``(N,)`` each (NaN where a heatmap has no positive
        relevance); ``share``: ``(N,)`` the conditional heatmap's sum over the unconditional one's.
    """
    from ..evaluation import relevance_mass_accuracy

    return dict(conditional=relevance_mass_accuracy(heatmaps, masks),
                unconditional=relevance_mass_accuracy(unconditional, masks),
                area=masks.flatten(1).double().mean(1),
                share=heatmaps.flatten(1).sum(1) / unconditional.flatten(1).sum(1))


def ground_truth(images, masks, labels, make_composite, layer_spec='neurons:3', k=20, per_class=3, draws=100,
                 composite=None, batch_size=50, path=None, seed=0, held_out_seed=None):
    """The whole experiment (module doc): reference samples, labels and purities, top vs random units,
    relevance mass, and the demo samples' conditional heatmaps.

    Parameters
    ----------
    images : torch.Tensor
        ``(N, 3, H, W)`` held-out images in 0..1.
    masks : torch.Tensor
        ``(N, H, W)`` bool object masks.
    labels : torch.Tensor
        ``(N,)`` their classes.
    layer_spec : str, optional
        The concept layer (:func:`lxt_ext.concepts.resolve_layer`).
    k : int, optional
        References per unit.
    per_class : int, optional
        Most relevant units per class.
    draws : int, optional
        Random draws (units; images for the chance level).
    make_composite : callable
        ``make_composite()`` builds a fresh composite (e.g. ``lambda: ViTGamma(attention='cp')``).
    composite : str, optional
        The composite's name, recorded only.
    batch_size : int, optional
        Images per backward.
    path : str, optional
        Where zennit-crp's maximisation files go (default a temporary folder).
    seed : int, optional
        The seed of the random draws.
    held_out_seed : int, optional
        The seed the images were drawn with (recorded only).

    Returns
    -------
    dict
        Everything the pictures, the page and the JSON show (tensors).

    Raises
    ------
    ValueError
        Bad arguments.
    """
    from tqdm import tqdm

    from . import (TransformerCondAttribution, TransformerFeatureVisualization, concept_layers,
                            label_units, most_relevant_units)
    from ..data import embedded

    if not 1 <= k <= min(MAX_K, len(images)):
        raise ValueError(f'k must be in 1..{min(MAX_K, len(images))} (at most {MAX_K}, and at most the images), '
                         f'got {k}')
    for name, value in (('draws', draws), ('units per class', per_class), ('batch size', batch_size)):
        if value < 1:
            raise ValueError(f'{name} must be at least 1, got {value}')
    model = embedded.load_model()
    layers = concept_layers(model)
    layer = resolve_layer(layer_spec, layers)
    classes = len(embedded.CLASSES)

    def preprocess(x):
        return (x - embedded.MEAN) / embedded.STD

    units = most_relevant_units(model, preprocess(images[:1]), make_composite(), layer, k=1).relevance.numel()
    if per_class > units:
        raise ValueError(f'{layer} has {units} units: at most {units} units per class')

    attribution = TransformerCondAttribution(model, taps=layers.taps)
    dataset = torch.utils.data.TensorDataset(images, labels)
    path = path or tempfile.mkdtemp(prefix='lxt-ext-concepts-')
    fv = TransformerFeatureVisualization(attribution, dataset, {layer: layers.layer_map[layer]},
                                         preprocess_fn=preprocess, path=path)
    checkpoints = fv.run_distributed(make_composite(), 0, len(dataset), batch_size=batch_size)
    fv.collect_results(checkpoints)

    references, values, labelled = {}, {}, {}
    for mode in ('relevance', 'activation'):
        indices, unit_values, _ = fv.reference_indices(layer, mode, r_range=(0, k))
        references[mode], values[mode] = indices.long(), unit_values
        labelled[mode] = label_units(indices, labels, k=k, num_classes=classes)

    demo_images, demo_masks, demo_labels, demo_names = embedded.load_samples()
    demo_x = preprocess(demo_images)
    chosen = class_units(model, demo_x, demo_labels, layer, make_composite, per_class, classes)
    top = sorted({u for units_of_class in chosen for u in units_of_class})

    generator = torch.Generator().manual_seed(seed)
    purity = {}
    random_units = None
    for mode in ('relevance', 'activation'):
        p = labelled[mode].purity
        draws_mean, first = random_purity(p, len(top), draws, generator)
        random_units = random_units or first
        purity[mode] = dict(top=p[top].mean().item(), random=draws_mean.mean().item(),
                            random_low=draws_mean.min().item(), random_high=draws_mean.max().item(),
                            all=p.mean().item())
    chance = chance_purity(labels, k, draws, generator, classes)

    x = preprocess(images)
    shown = top + [u for u in random_units if u not in top]
    heat, mass = {}, {}
    for unit in tqdm(shown, desc='conditional heatmaps of references', dynamic_ncols=True):
        refs = references['relevance'][:, unit]
        heat[unit] = conditional_heatmaps(attribution, make_composite, layer, layers.mask_map, x[refs], labels[refs],
                                          unit, batch_size)
        unconditional = conditional_heatmaps(attribution, make_composite, layer, layers.mask_map, x[refs],
                                             labels[refs], None, batch_size)
        mass[unit] = localisation(heat[unit], unconditional, masks[refs])

    def pooled(group, key):
        return torch.cat([mass[u][key] for u in group]).nanmean().item()

    relevance_mass = {group: {key: pooled(units_of, key) for key in ('conditional', 'unconditional', 'area')}
                      for group, units_of in (('top', top), ('random', random_units))}

    demo_unconditional = conditional_heatmaps(attribution, make_composite, layer, layers.mask_map, demo_x,
                                              demo_labels, None, batch_size)
    demo_heat = [torch.cat([conditional_heatmaps(attribution, make_composite, layer, layers.mask_map,
                                                 demo_x[i:i + 1], demo_labels[i:i + 1], u, batch_size)
                            for u in chosen[int(demo_labels[i])]])
                 for i in tqdm(range(len(demo_x)), desc='demo samples', dynamic_ncols=True)]
    demo_mass = localisation(torch.stack([h[0] for h in demo_heat]), demo_unconditional, demo_masks)
    return dict(layer=layer, units=units, k=k, images=len(images), classes=embedded.CLASSES, chosen=chosen, top=top,
                random_units=random_units, draws=draws, labels=labelled, references=references, values=values,
                purity=purity, chance=chance.mean().item(), heatmaps=heat, mass=mass, relevance_mass=relevance_mass,
                demo=dict(images=demo_images, masks=demo_masks, labels=demo_labels, names=demo_names,
                          unconditional=demo_unconditional, heatmaps=demo_heat, first_unit_mass=demo_mass),
                composite=composite, path=path, seed=held_out_seed,
                data=dict(images=images, masks=masks, labels=labels))
