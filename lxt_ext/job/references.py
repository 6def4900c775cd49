"""``ReferenceJob`` (``lxt-ext references``): every chosen unit's reference samples over a data set, its top-``k``
images by relevance and by activation (zennit-crp's relevance and activation maximisation), streamed on the job
runner of ``lxt-ext explain`` (:class:`~lxt_ext.job.runner.BatchJob`: fixed batches, resumable, sharded over
``torchrun`` processes), written as image sheets and an HTML page per layer.

What is ranked (as :class:`lxt_ext.concepts.TransformerFeatureVisualization` ranks it): each image is explained
for its class (its label, its predicted class or a given class) under a transformer composite; the relevance of a
layer's output is ``a * g`` (activation times the gradient arriving there, the Gradient x Input convention). A
unit's value in an image is its relevance (or activation) summed over the tokens (``max_target='sum'``, a head's
channels summed too) or at its largest token (``'max'``), divided by the image's summed absolute value over ALL
units of the layer when ``abs_norm`` (zennit-crp's default), then the images are ranked per unit, ties to the
smaller image index. The unit's token in an image is the token of its largest relevance (activation), as zennit-crp
records it (its "receptive field"); its patch is the same with a ViT's class token left out: the patch the sheets
box and crop (the class token is often a unit's largest token and has no place in the image; -1, no patch, where
the unit's patches are all equal, e.g. the relevance at the last block, whose patches feed no output).

Streaming: each batch writes only its own per-unit top ``k`` (value, image index, token, patch;
``topk/batch-<b>.pt``) before its index part; at the end rank 0 merges the top ``k`` over all parts, one part at a
time, so memory does not grow with the number of images, and the top ``k`` of the union is the top ``k`` of the
per-batch tops. A run
killed at any moment and rerun gives the outputs of an uninterrupted run; a run under ``torchrun`` those of one
process (the batches are the same). The parts name images by their place in the list of inputs, so a resume with
other images (another count or list: ``images``, ``images_sha256`` in ``run.json``) is refused, unlike ``lxt-ext
explain``'s.

Output folder (beside ``run.json``, ``parts/``, ``index.jsonl`` (one row per image: ``path``, ``image``,
``label``, ``predicted``, ``explained``, ``logit``) and ``failures.jsonl`` of ``lxt_ext.job.outputs``)::

    topk/batch-<b>.pt             the batch's per-unit top k, per layer and mode (value, index, token, patch)
    references.json               the merged references: per layer, mode and unit the ranked images
                                  (rank, image, path, value, token, patch, label, explained)
    index.html                    a link per layer
    layers/<layer>/index.html     the layer's page: per unit its strips and its references with their values
    layers/<layer>/<mode>-<p>.png the sheets: one row per unit (up to ``SHEET_UNITS`` units a page), each its top
                                  images (the unit's patch boxed) over their conditional heatmaps (and crops)
    layers/<layer>/units/<mode>-<unit>.png   each unit's strip, as the page shows it

Text: :class:`TextReferenceJob` (``lxt-ext references --text``) is the same search over the windows of a token
corpus for a causal language model (its items the windows of :func:`token_windows`, each explained for the sum of
its next-token logits, :func:`next_token_seed`), written as HTML pages of text spans with their n-gram labels.

A reference's conditional heatmap is zennit-crp's: the unit's activation as relevance at the layer, the other
units masked, propagated to the pixels (:class:`lxt_ext.concepts.TransformerCondAttribution` with
``start_layer``), as ``FeatureVisualization.get_max_reference`` draws it.
"""
import contextlib
import json
import math
import os
import sys

import torch

from ..attribution import Explainer, logits_of
from . import inputs as job_inputs
from .evaluation import DEFAULT_SEED, check_generated, generated
from .outputs import INDEX_FILE, atomic_write, settings_hash
from .runner import BatchJob

__all__ = ['ReferenceJob', 'TextReferenceJob', 'token_windows', 'collect', 'unit_values', 'top_k', 'ranges', 'MODES', 'MAX_TARGETS', 'SHEET_UNITS',
           'REFERENCES_FILE']

MODES = ('relevance', 'activation')
MAX_TARGETS = ('sum', 'max')
SHEET_UNITS = 16            # units per sheet page
REFERENCES_FILE = 'references.json'
FIELDS = ('value', 'index', 'token', 'patch')  # what a part holds per layer, mode and unit
ROOT = 'generated'          # the input root of generated images


def unit_values(concept, tensor, max_target='sum', abs_norm=True):
    """Each unit's value and token per sample, as zennit-crp's reference sampling computes them.

    Parameters
    ----------
    concept : lxt_ext.concepts.HiddenConcept or HeadConcept
        The layer's concept (its ``reference_sampling``).
    tensor : torch.Tensor
        The layer's relevance or activation, ``(samples, tokens, channels)``.
    max_target : {'sum', 'max'}, optional
        Summed over the tokens, or the largest token.
    abs_norm : bool, optional
        Divided by the sample's summed absolute value over all units of the layer.

    Returns
    -------
    tuple of torch.Tensor
        ``(values, tokens)``, each ``(samples, units)``, in sample order.
    """
    order, values, tokens = concept.reference_sampling(tensor, max_target=max_target, abs_norm=abs_norm)
    return (torch.empty_like(values).scatter_(0, order, values), torch.empty_like(tokens).scatter_(0, order, tokens))


def top_k(values, indices, k, *columns):
    """Per column the ``k`` rows of largest value, ties to the smaller index: a total order, so the top ``k`` of
    a union is the top ``k`` of its parts' tops, whatever the parts.

    Parameters
    ----------
    values : torch.Tensor
        ``(rows, units)``.
    indices : torch.Tensor
        ``(rows, units)`` int64 sample indices.
    k : int
        How many rows to keep (fewer when there are fewer).
    *columns : torch.Tensor
        ``(rows, units)`` each, kept with their rows (tokens).

    Returns
    -------
    tuple of torch.Tensor
        ``(values, indices, *columns)``, each ``(min(k, rows), units)``, best first.
    """
    tensors = (values, indices, *columns)
    order = torch.sort(indices, dim=0, stable=True).indices
    tensors = tuple(t.gather(0, order) for t in tensors)
    order = torch.sort(tensors[0], dim=0, descending=True, stable=True).indices[:k]
    return tuple(t.gather(0, order) for t in tensors)


def collect(out):
    """The merged references of a finished folder (``references.json``).

    Parameters
    ----------
    out : str
        The folder a :class:`ReferenceJob` wrote.

    Returns
    -------
    dict
        ``settings``, ``images``, ``layers``: ``layer -> {'units': [...], 'tokens': int, mode: {unit (str):
        [reference rows, best first]}}``.

    Raises
    ------
    FileNotFoundError
        When the folder holds no finished search.
    """
    path = os.path.join(out, REFERENCES_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{out} holds no finished reference search (no {REFERENCES_FILE})')
    with open(path, encoding='utf-8') as file:
        return json.load(file)


def ranges(units):
    """Units as compact text: runs of consecutive indices as ``a-b`` (``[0, 1, 2, 5]`` -> ``'0-2,5'``).

    Parameters
    ----------
    units : sequence of int
        Unit indices.

    Returns
    -------
    str
    """
    parts, units = [], list(units)
    start = 0
    for i in range(1, len(units) + 1):
        if i == len(units) or units[i] != units[i - 1] + 1:
            first, last = units[start], units[i - 1]
            parts.append(str(first) if first == last else f'{first}-{last}')
            start = i
    return ','.join(parts)


def _file_name(layer):
    return ''.join(c if c.isalnum() or c in '._-' else '_' for c in layer)


class ReferenceJob(BatchJob):
    """Find the reference samples of chosen units over an image folder or generated images (module doc).

    Parameters
    ----------
    model : torch.nn.Module
        The model, in eval mode (a transformer that :func:`lxt_ext.concepts.concept_layers` knows, or give
        ``layers`` as a dict with ``taps``).
    composite : lxt_ext.composites.TransformerComposite
        The transformer composite (e.g. ``ViTGamma()``); registered while the images are explained and for the
        heatmaps.
    layers : sequence of str or dict of str to Concept
        Layer names of ``concept_layers(model)``, or names mapped to their concepts.
    out : str
        The output folder.
    k : int, optional
        References per unit and mode (default 8).
    units : sequence of int or dict of str to sequence of int, optional
        The units of every layer, or per layer (default all units).
    inputs : sequence of str, optional
        Image files, folders, globs or list files (as ``lxt-ext explain``); exclusive with ``generate``.
    generate : int, optional
        Search ``generate`` generated shapes images of the embedded model (``lxt_ext.job.evaluation``'s seeded
        blocks from ``data_seed``; the training seeds are refused).
    data_seed : int, optional
        The first seed of the generated images.
    size : int, optional
        The model's input size (default 64, the generated images' size).
    mean, std : sequence of float, optional
        The model's normalisation of images in 0..1.
    resize : {'stretch', 'none'}, optional
        As ``lxt-ext explain``.
    target : {'label', 'predicted'} or int, optional
        The class each image is explained for: its label (generated images only; their default), its predicted
        class (the default for files) or a class index.
    max_target : {'sum', 'max'}, optional
        A unit's value per image (module doc).
    abs_norm : bool, optional
        Normalise per image over the layer's units (module doc).
    identity : dict, optional
        What identifies the model and the composite (recorded; a resume with other values is refused).
    forward : callable, optional
        ``forward(model, x) -> logits`` (default ``model(x)``).
    taps : dict of str to str, optional
        Input taps (default those of ``concept_layers(model)`` the layers need).
    classes : sequence of str, optional
        Class names, for the pages (default the embedded model's for generated images).
    rows : sequence of {'image', 'heatmap', 'crop'}, optional
        What each reference shows in the sheets (default image and heatmap).
    cmap : str, optional
        The heatmaps' colour map.
    batch_size : int, optional
        Images per batch (recorded: it fixes the batches a resume skips).
    heatmap_batch : int, optional
        Conditional heatmaps per backward at the end.
    workers : int, optional
        DataLoader processes decoding image files.
    device : str, optional
        The torch device.
    resume, progress, writers
        As in :class:`~lxt_ext.job.runner.BatchJob`.

    Raises
    ------
    ValueError
        Bad arguments (named), e.g. an unknown layer, a unit out of range, k below 1, both or neither of
        ``inputs`` and ``generate``, a label target without labels.
    TypeError
        A composite that is no transformer composite.
    """

    verb, unit = 'searching', 'img'

    def __init__(self, model, composite, layers, out, k=8, units=None, inputs=None, generate=None,
                 data_seed=DEFAULT_SEED, size=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize='stretch',
                 target=None, max_target='sum', abs_norm=True, identity=None, forward=None, taps=None, classes=None,
                 rows=('image', 'heatmap'), cmap='coldnhot', batch_size=32, heatmap_batch=64, workers=0, device='cpu',
                 resume=True, progress=True, writers=1):
        from ..composites.transformer import TransformerComposite
        from ..visualization.references import ROWS

        if not isinstance(composite, TransformerComposite):
            raise TypeError(f'reference samples need a transformer composite (lxt_ext.composites.ViTGamma, ...; the '
                            f'relevance at a layer is a * g there), got {type(composite).__name__}')
        if (inputs is None) == (generate is None):
            raise ValueError('give either inputs (image files, folders) or a number of images to generate')
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f'k must be a positive integer, got {k!r}')
        if max_target not in MAX_TARGETS:
            raise ValueError(f'max_target must be one of {MAX_TARGETS}, got {max_target!r}')
        for name, value in (('batch_size', batch_size), ('heatmap_batch', heatmap_batch), ('writers', writers)):
            if value < 1:
                raise ValueError(f'{name} must be positive, got {value}')
        if workers < 0:
            raise ValueError(f'workers must be 0 or more, got {workers}')
        if not rows or any(r not in ROWS for r in rows):
            raise ValueError(f'rows must be some of {ROWS}, got {tuple(rows)}')
        if generate is not None:
            if generate < 1:
                raise ValueError(f'the number of generated images must be positive, got {generate}')
            check_generated(data_seed, generate)
            target = 'label' if target is None else target
            if classes is None:
                from ..data import shapes
                classes = shapes.CLASSES
            size = size or 64
        else:
            if isinstance(inputs, str):
                inputs = [inputs]
            if not inputs:
                raise ValueError('no inputs given')
            target = 'predicted' if target is None else target
            if size is None:
                raise ValueError('give the model\'s input size for image files')
            if resize not in job_inputs.RESIZE_MODES:
                raise ValueError(f'resize must be one of {job_inputs.RESIZE_MODES}, got {resize!r}')
            if target == 'label':
                raise ValueError('target label needs labelled images (generated ones); image files are explained for '
                                 'their predicted class or a given class')
        if not (target in ('label', 'predicted') or (isinstance(target, int) and not isinstance(target, bool)
                                                      and target >= 0)):
            raise ValueError(f"target must be 'label', 'predicted' or a class index, got {target!r}")
        super().__init__(out, batch_size, device, resume, progress, writers)
        self.model, self.composite, self.forward = model, composite, forward or (lambda model, x: model(x))
        self.k, self.inputs, self.generate, self.data_seed = k, inputs, generate, data_seed
        self.size, self.resize, self.target = int(size), resize, target
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.max_target, self.abs_norm = max_target, bool(abs_norm)
        self.identity, self.classes = dict(identity or {}), (list(classes) if classes is not None else None)
        self.rows, self.cmap, self.heatmap_batch, self.workers = tuple(rows), cmap, heatmap_batch, workers
        self.layer_map, self.taps = self._layers(layers, taps)
        self.shapes = self._probe()
        self.units = self._units(units)

    # -- the layers and their units --

    def _layers(self, layers, taps):
        if isinstance(layers, str):
            layers = [layers]
        if not layers:
            raise ValueError('no layers given')
        known = None
        if not isinstance(layers, dict) or taps is None:
            from ..concepts import concept_layers
            try:
                known = concept_layers(self.model)
            except TypeError as error:
                if not isinstance(layers, dict):
                    raise ValueError(str(error)) from None
        if isinstance(layers, dict):
            layer_map = dict(layers)
        else:
            unknown = [name for name in layers if name not in known.layer_map]
            if unknown:
                raise ValueError(f'unknown layer{"s" * (len(unknown) > 1)} {", ".join(unknown)}: the concept layers '
                                 f'of {type(self.model).__name__} are {", ".join(known.layer_map)}')
            layer_map = {name: known.layer_map[name] for name in dict.fromkeys(layers)}
        if taps is None:
            taps = {} if known is None else {name: t for name, t in known.taps.items() if name in layer_map}
        return layer_map, dict(taps)

    @contextlib.contextmanager
    def _registered(self, model):
        """The taps inserted and forward hooks recording each layer's output (``self._outputs``)."""
        from ..concepts import input_taps

        self._outputs = {}
        with input_taps(model, self.taps):
            modules = dict(model.named_modules())
            missing = [name for name in self.layer_map if name not in modules]
            if missing:
                raise ValueError(f'no module {", ".join(missing)} in {type(model).__name__}')

            def hook(name):
                def record(module, args, output):
                    tensor = output[0] if isinstance(output, (tuple, list)) else output
                    self._outputs[name] = tensor.detach()
                return record
            handles = [modules[name].register_forward_hook(hook(name)) for name in self.layer_map]
            try:
                yield
            finally:
                for handle in handles:
                    handle.remove()

    def _probe(self):
        """Each layer's output shape for one image (a forward of a blank image with the composite registered: an
        attention rule calls its heads tap)."""
        x = self._probe_input()
        parameter = next(self.model.parameters(), None)
        if parameter is not None:
            x = x.to(device=parameter.device, dtype=parameter.dtype)
        with self._registered(self.model), self.composite.context(self.model) as modified, torch.enable_grad():
            logits_of(self.forward(modified, x.requires_grad_()))
        missing = [name for name in self.layer_map if name not in self._outputs]
        if missing:
            raise ValueError(f'layer{"s" * (len(missing) > 1)} {", ".join(missing)} did not run in a forward pass')
        shapes = {name: tuple(self._outputs[name].shape[1:]) for name in self.layer_map}
        self._outputs = {}
        return shapes

    def _probe_input(self):
        """One blank sample of the model's input (a grey image), for :meth:`_probe`."""
        return (torch.full((1, 3, self.size, self.size), 0.5) - self.mean) / self.std

    @staticmethod
    def _patches(concept, tensor):
        """``(samples, units)``: each unit's largest patch token (the class token, token 0, left out), -1 where
        its patches are all equal (e.g. no relevance reaches them: the last block's patches feed no output)."""
        per_token = concept._per_token(tensor[:, 1:])
        patches = per_token.argmax(1) + 1
        return patches.masked_fill_(per_token.amax(1) == per_token.amin(1), -1)

    def _class_token(self, layer):
        """Whether the layer's tokens are a class token and a square grid of patches (torchvision's ViT)."""
        tokens = self.tokens(layer)
        grid = int(round((tokens - 1) ** 0.5))
        return len(self.shapes[layer]) == 2 and tokens > 1 and grid * grid == tokens - 1

    def unit_count(self, layer):
        """The number of units of a layer (channels, neurons, or heads).

        Parameters
        ----------
        layer : str
            One of the job's layers.

        Returns
        -------
        int
        """
        channels = self.shapes[layer][-1]
        head_dim = getattr(self.layer_map[layer], 'head_dim', 1)
        return channels // head_dim

    def tokens(self, layer):
        """The tokens of a layer's output (the dimensions between batch and channels, flattened).

        Parameters
        ----------
        layer : str
            One of the job's layers.

        Returns
        -------
        int
        """
        return math.prod(self.shapes[layer][:-1])

    def _units(self, units):
        chosen = {}
        for name in self.layer_map:
            count = self.unit_count(name)
            given = units.get(name) if isinstance(units, dict) else units
            given = list(range(count)) if given is None else [int(u) for u in given]
            if not given:
                raise ValueError(f'no units chosen for {name}')
            bad = [u for u in given if not 0 <= u < count]
            if bad:
                raise ValueError(f'unit{"s" * (len(bad) > 1)} {ranges(bad)} out of range: {name} has '
                                 f'{count} units (0..{count - 1})')
            if len(set(given)) != len(given):
                raise ValueError(f'units of {name} given twice: {given}')
            chosen[name] = given
        if isinstance(units, dict):
            extra = [name for name in units if name not in self.layer_map]
            if extra:
                raise ValueError(f'units given for layers not searched: {", ".join(extra)}')
        return chosen

    # -- BatchJob --

    def recorded(self):
        if self.generate is None and getattr(self, '_listed', None) is None:
            self.items()
        data = (dict(generated=self.generate, data_seed=self.data_seed) if self.generate is not None else
                dict(size=self.size, resize=self.resize, mean=self.mean.flatten().tolist(),
                     std=self.std.flatten().tolist(), **self._listed))
        layers = {name: ranges(self.units[name]) for name in self.layer_map}
        return dict(self.identity, kind='references', layers=layers,
                    k=self.k, max_target=self.max_target, abs_norm=self.abs_norm, target=self.target,
                    batch_size=self.batch_size, **data)

    def items(self):
        if self.generate is not None:
            return ROOT, [f'{i:06d}' for i in range(self.generate)]
        root, names = job_inputs.collect(self.inputs)
        # the image indices of the parts are places in this list: a resume must find the same list
        self._listed = {'images': len(names), 'images_sha256': settings_hash(names)}
        return root, names

    def load(self, root, names, spans):
        if self.generate is not None:
            return ((span, images, span, {}, labels) for span, (images, _, labels) in
                    zip(spans, generated(self.data_seed, spans)))
        dataset = job_inputs.ImageFiles(root, names, self.size, self.resize)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=spans, num_workers=self.workers,
                                             collate_fn=job_inputs.collate)
        return ((*batch, None) for batch in loader)

    @contextlib.contextmanager
    def session(self, group):
        self._device = group.device
        parameter = next(self.model.parameters(), None)
        self._dtype = parameter.dtype if parameter is not None else torch.float32
        model = self.model.to(group.device)
        with self._registered(model), Explainer(model, self.composite, self.forward, list(self.layer_map)) as explainer:
            yield explainer

    def compute(self, explainer, batch, indices, loaded, names):
        _, images, done, errors, labels = loaded
        failures = [{'path': names[i], 'error': errors[i]} for i in indices if i in errors]
        if images is None:
            return ([], {}), 0, failures
        x = ((images - self.mean) / self.std).to(device=self._device, dtype=self._dtype)
        if self.target == 'label':
            target = labels.to(self._device)
        elif self.target == 'predicted':
            target = None
        else:
            target = self.target
        explanation = explainer(x, target)
        part = {}
        index = torch.tensor(done, dtype=torch.int64)[:, None]
        for name, concept in self.layer_map.items():
            columns = torch.tensor(self.units[name])
            for mode, tensor in (('relevance', explanation.latent[name]), ('activation', self._outputs[name])):
                tensor = tensor.detach().float().cpu()
                values, tokens = unit_values(concept, tensor, self.max_target, self.abs_norm)
                patches = self._patches(concept, tensor) if self._class_token(name) else tokens
                part[f'{name}\t{mode}'] = top_k(values[:, columns], index.expand(-1, len(columns)), self.k,
                                                 tokens[:, columns].long(), patches[:, columns].long())
        self._outputs = {}
        predicted = explanation.output.float().argmax(1).cpu()
        explained, logit = explanation.target.cpu(), explanation.score.float().cpu()
        rows = [{'path': names[i], 'image': i, 'label': None if labels is None else int(labels[j]),
                 'predicted': int(predicted[j]), 'explained': int(explained[j]), 'logit': float(logit[j])}
                for j, i in enumerate(done)]
        return (rows, part), len(done), failures

    def write(self, batch, result, failures):
        rows, part = result
        data = {f'{key}\t{field}': tensor.contiguous() for key, tensors in part.items()
                for field, tensor in zip(FIELDS, tensors)}
        atomic_write(self.folder.path('topk', f'batch-{batch:07d}.pt'), lambda f: torch.save(data, f))
        self.folder.write_part(batch, rows, failures)

    # -- the merge and the pictures (rank 0) --

    def merge_parts(self, batches):
        """The top ``k`` per layer, mode and unit over the parts of ``batches``, read one at a time.

        Parameters
        ----------
        batches : iterable of int
            The batch numbers (those without a top-k file are skipped).

        Returns
        -------
        dict
            ``(layer, mode) -> (values, indices, tokens, patches)``, each ``(min(k, images), units)``.
        """
        merged = {}
        for b in batches:
            path = self.folder.path('topk', f'batch-{b:07d}.pt')
            if not os.path.exists(path):
                continue
            data = torch.load(path, weights_only=True)
            for name in self.layer_map:
                for mode in MODES:
                    key = f'{name}\t{mode}'
                    if f'{key}\tvalue' not in data:
                        continue
                    part = tuple(data[f'{key}\t{field}'] for field in FIELDS)
                    if (name, mode) in merged:
                        part = tuple(torch.cat([a, b]) for a, b in zip(merged[name, mode], part))
                    merged[name, mode] = top_k(part[0], part[1], self.k, *part[2:])
        return merged

    def merged(self, root, names):
        batches = math.ceil(len(names) / self.batch_size)
        merged = self.merge_parts(range(batches))
        wanted = {int(i) for tensors in merged.values() for i in tensors[1].flatten().tolist()}
        rows = {}
        with open(self.folder.path(INDEX_FILE), encoding='utf-8') as file:
            for line in file:
                row = json.loads(line)
                if row['image'] in wanted:
                    rows[row['image']] = row
        layers = {}
        for name in self.layer_map:
            entry = {'units': self.units[name], 'tokens': self.tokens(name)}
            for mode in MODES:
                values, indices, tokens, patches = merged.get((name, mode),
                                                              (torch.zeros(0, len(self.units[name])),) * len(FIELDS))
                entry[mode] = {str(unit): [
                    {'rank': r, 'image': int(indices[r, u]), 'path': rows[int(indices[r, u])]['path'],
                     'value': float(values[r, u]), 'token': int(tokens[r, u]), 'patch': int(patches[r, u]),
                     'label': rows[int(indices[r, u])]['label'], 'explained': rows[int(indices[r, u])]['explained']}
                    for r in range(values.shape[0])] for u, unit in enumerate(self.units[name])}
            layers[name] = entry
        result = {'settings': self.recorded(), 'images': len(names), 'layers': layers}
        self._render(root, layers)
        text = json.dumps(result, indent=1).encode()
        atomic_write(self.folder.path(REFERENCES_FILE), lambda f: f.write(text))

    def _settings_lines(self):
        data = (f'{self.generate:,} generated shapes images (seeds from {self.data_seed}, {self.size} x {self.size})'
                if self.generate is not None else f'image files: {", ".join(map(str, self.inputs))}')
        target = {'label': 'its label', 'predicted': 'its predicted class'}.get(self.target, f'class {self.target}')
        composite = self.identity.get('composite', type(self.composite).__name__)
        return [f'model: {self.identity.get("model", type(self.model).__name__)}, composite: {composite}', data,
                f'each image explained for {target}; a unit\'s value: its relevance (a * g at the layer output) or '
                f'activation {"summed over" if self.max_target == "sum" else "at the largest of"} the tokens'
                + (', divided by the image\'s summed |value| over the layer\'s units' if self.abs_norm else ''),
                f'top {self.k} images per unit and mode, ties to the smaller image index; box: the patch of the '
                f'unit\'s largest value in the image (the class token left out); heatmap: the unit\'s activation '
                f'propagated back from the layer, the other units masked (zennit-crp\'s conditional heatmap; red '
                f'positive, blue negative)']

    def _images(self, root, indices):
        """``(images, rows)``: the generated images among ``indices`` as one ``(n, 3, H, W)`` uint8 tensor (each
        block generated once) and ``{index: row}``; None for image files (decoded when drawn)."""
        if self.generate is None:
            return None
        from .evaluation import BLOCK

        wanted = sorted(set(indices))
        rows = {index: row for row, index in enumerate(wanted)}
        images = torch.empty(len(wanted), 3, self.size, self.size, dtype=torch.uint8)
        blocks = {}
        for i in wanted:
            blocks.setdefault(i // BLOCK, []).append(i)
        for block, members in blocks.items():
            span = [list(range(block * BLOCK, min(self.generate, (block + 1) * BLOCK)))]
            block_images = next(generated(self.data_seed, span))[0]
            for i in members:
                images[rows[i]] = block_images[i - block * BLOCK].mul(255).round_().to(torch.uint8)
            del block_images
        return images, rows

    def _image(self, cache, root, path, index):
        if cache is not None:
            images, rows = cache
            return images[rows[index]].float() / 255
        return job_inputs.decode(os.path.join(root, path), self.size, self.resize)

    def _render(self, root, layers):
        from tqdm import tqdm

        from ..visualization.references import Reference, index_page, layer_page, patch_box, sheet, unit_strip

        progress = tqdm(total=sum(len(self.units[n]) * len(MODES) for n in self.layer_map), unit='unit',
                        desc='drawing references', disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        cache = self._images(root, [row['image'] for entry in layers.values() for mode in MODES
                                    for refs in entry[mode].values() for row in refs])
        settings = self._settings_lines()
        front = []
        for name, entry in layers.items():
            folder = os.path.join('layers', _file_name(name))
            concept = self.layer_map[name]
            units = entry['units']
            pages, sheets = {}, {}
            for mode in MODES:
                pages[mode], sheets[mode] = {}, []
                for first in range(0, len(units), SHEET_UNITS):
                    chunk = units[first:first + SHEET_UNITS]
                    pairs = [(unit, row) for unit in chunk for row in entry[mode][str(unit)]]
                    pictures = [self._image(cache, root, row['path'], row['image']) for _, row in pairs]
                    heatmaps = []
                    if 'heatmap' in self.rows:
                        for start in range(0, len(pairs), self.heatmap_batch):
                            chunk_pairs = pairs[start:start + self.heatmap_batch]
                            heatmaps += list(self.conditional_heatmaps(
                                name, torch.stack(pictures[start:start + self.heatmap_batch]),
                                [unit for unit, _ in chunk_pairs]))
                    strips = []
                    for unit in chunk:
                        refs = [(j, row) for j, (u, row) in enumerate(pairs) if u == unit]
                        references = [Reference(pictures[j], heatmaps[j] if heatmaps else None,
                                                patch_box(row['patch'], entry['tokens'], self.size), self._caption(row))
                                      for j, row in refs]
                        strip = unit_strip(references, self._title(unit, mode, [row for _, row in refs]),
                                           self._note([row for _, row in refs]), self.rows, self.cmap,
                                           columns=self.k)
                        relative = os.path.join('units', f'{mode}-{unit:04d}.png')
                        self._save(strip, os.path.join(folder, relative))
                        pages[mode][unit] = {'strip': relative, 'references': entry[mode][str(unit)]}
                        strips.append(strip)
                        progress.update()
                    page = len(sheets[mode]) + 1
                    path = f'{mode}-{page}.png'
                    total = len(units)
                    described = (f'units {chunk[0]}..{chunk[-1]}' if chunk == list(range(chunk[0], chunk[-1] + 1))
                                 else f'units {", ".join(map(str, chunk))}')
                    self._save(sheet(strips, f'{name}: {mode} maximisation, {described} ({first + 1}..'
                                             f'{first + len(chunk)} of {total} chosen)',
                                     self._sheet_lines(mode)), os.path.join(folder, path))
                    sheets[mode].append(path)
            text = layer_page(name, units, pages, settings, sheets, self.classes).encode()
            atomic_write(self.folder.path(folder, 'index.html'), lambda f, t=text: f.write(t))
            front.append((name, f'{folder}/index.html', len(units),
                          {mode: [f'{folder}/{p}' for p in paths] for mode, paths in sheets.items()}))
        progress.close()
        text = index_page('Reference samples', settings, front).encode()
        atomic_write(self.folder.path('index.html'), lambda f: f.write(text))

    def conditional_heatmaps(self, layer, images, units):
        """The conditional heatmaps the sheets show: each image's heatmap of one unit, zennit-crp's (the unit's
        activation as the relevance at ``layer``, the other units masked, propagated to the pixels under the job's
        composite: ``TransformerCondAttribution`` with ``start_layer``, as ``get_max_reference`` draws them).

        Parameters
        ----------
        layer : str
            One of the job's layers.
        images : torch.Tensor
            ``(n, 3, H, W)`` in 0..1 (normalised here).
        units : sequence of int
            The unit of each image.

        Returns
        -------
        torch.Tensor
            ``(n, H, W)`` float32 on the CPU.
        """
        from ..concepts import TransformerCondAttribution

        parameter = next(self.model.parameters())
        if getattr(self, '_attribution', None) is None:
            self._attribution = TransformerCondAttribution(self.model, taps=self.taps)
        x = ((images - self.mean) / self.std).to(device=parameter.device, dtype=parameter.dtype)
        result = self._attribution(x.requires_grad_(), [{layer: [int(unit)]} for unit in units], self.composite,
                                   mask_map={layer: self.layer_map[layer].mask}, start_layer=layer,
                                   exclude_parallel=False)
        return result.heatmap.detach().float().cpu()

    def _save(self, picture, relative):
        atomic_write(self.folder.path(relative), lambda f: picture.save(f, format='PNG'))

    def _label(self, label):
        if label is None:
            return ''
        return self.classes[label] if self.classes is not None and 0 <= label < len(self.classes) else str(label)

    def _caption(self, row):
        label = self._label(row['label'])
        return f'#{row["rank"] + 1}  {row["value"]:.3g}' + (f'  {label}' if label else '')

    def _title(self, unit, mode, rows):
        if not rows:
            return f'unit {unit}: no images'
        return f'unit {unit}   {mode} {rows[0]["value"]:.3g} .. {rows[-1]["value"]:.3g}'

    def _note(self, rows):
        labels = [row['label'] for row in rows if row['label'] is not None]
        if not labels:
            return ''
        best = max(sorted(set(labels)), key=labels.count)
        return f'{self._label(best)}: {labels.count(best)} of {len(rows)}'

    def _sheet_lines(self, mode):
        what = {'image': 'the image (the unit\'s largest patch boxed)', 'heatmap': 'its conditional heatmap '
                '(the unit alone, from the layer; red positive, blue negative)',
                'crop': 'the boxed patch with its neighbours, enlarged'}
        return [f'each unit: its top {self.k} images by {mode} (value under each, its label if known); rows: '
                + '; '.join(what[r] for r in self.rows)]


# -- token windows of a text corpus (a language model's reference text spans) --

def _sha256(path):
    import hashlib

    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for block in iter(lambda: file.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def token_windows(files, tokenizer, window):
    """The windows of a token corpus: each file read as UTF-8 and tokenised whole with ``tokenizer`` (no special
    tokens added), cut into windows of ``window`` tokens at stride ``window``; each file's last partial window is
    dropped (windows never cross files).

    Parameters
    ----------
    files : sequence of str
        UTF-8 text files, in order.
    tokenizer : transformers.PreTrainedTokenizerBase
        The model's tokenizer.
    window : int
        Tokens per window.

    Returns
    -------
    tuple
        ``(ids, starts, info)``: ``ids`` a ``(windows, window)`` int32 array on disk (``numpy.memmap`` of a
        temporary file: the corpus' ids are not held in memory, one file's text and ids while it is tokenised);
        ``starts`` per window ``(file index, first token)``; ``info`` per file ``{'path', 'sha256', 'tokens'}``.

    Raises
    ------
    FileNotFoundError
        A file that does not exist.
    ValueError
        A file that is no UTF-8 text, a window below 2, no whole window in the corpus.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f'window must be an integer of at least 2 tokens, got {window!r}')
    import tempfile

    import numpy as np

    store = tempfile.TemporaryFile()  # the windows' ids on disk (int32), removed when closed
    count, starts, info = 0, [], []
    for f, path in enumerate(files):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'no such text file: {path}')
        try:
            with open(path, encoding='utf-8') as file:
                text = file.read()
        except UnicodeDecodeError as error:
            raise ValueError(f'{path} is no UTF-8 text: {error}') from None
        ids = np.asarray(tokenizer(text, add_special_tokens=False)['input_ids'], dtype=np.int64)
        del text
        if len(ids) and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
            raise ValueError(f'{path}: token ids outside int32')
        whole = len(ids) // window
        store.write(ids[:whole * window].astype(np.int32).tobytes())
        count += whole
        starts += [(f, w * window) for w in range(whole)]
        info.append({'path': path, 'sha256': _sha256(path), 'tokens': len(ids)})
    if not count:
        store.close()
        raise ValueError(f'the text holds no whole window of {window} tokens '
                         f'({sum(i["tokens"] for i in info)} tokens in all): give more text or a smaller window')
    store.flush()
    return np.memmap(store, dtype=np.int32, mode='r', shape=(count, window)), starts, info


def next_token_seed(ids):
    """The explained score of a window as a target of :class:`~lxt_ext.attribution.Explainer`: at every position
    but the last, the logit of the window's next actual token (its relevance seed, the logit itself), so the score
    is the sum over positions ``0 .. W-2`` of ``logit[t, ids[t + 1]]``.

    Parameters
    ----------
    ids : torch.Tensor
        ``(windows, W)`` token ids.

    Returns
    -------
    callable
        ``logits (windows, W, vocabulary) -> seed`` of the same shape.
    """
    def seed(output):
        mask = torch.zeros_like(output)
        mask[:, :-1].scatter_(2, ids[:, 1:, None].to(output.device), 1.0)
        return output * mask
    return seed


class TextReferenceJob(ReferenceJob):
    """The reference search of :class:`ReferenceJob` over a token corpus for a causal language model: its items are
    the windows of :func:`token_windows` (``window`` tokens, stride ``window``, each file's last partial window
    dropped), each explained for the sum over its positions of the logit of the next actual token
    (:func:`next_token_seed`) under a ``LanguageTransformer`` composite; a unit's relevance is ``a * g`` at the
    layer's output, its value per window as :class:`ReferenceJob`'s (summed over the tokens or the largest,
    ``abs_norm``), and its ``token`` is the position of its largest value in the window. Batches, parts, merge,
    resume and ``torchrun`` are the image job's; ``run.json`` records the corpus files with their sha256, their
    token counts and the window, so a resume over another corpus or window is refused. The pages are HTML only:
    per layer each unit's top text spans (tokens around its top token, that token highlighted) with their values
    and the unit's label of :func:`lxt_ext.concepts.label_text_units` (its most common n-gram among the spans up to
    the top token and the share of spans holding it).

    Parameters
    ----------
    model : torch.nn.Module
        A causal language model of transformers (LLaMA family, GPT-2), in eval mode.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer.
    composite : lxt_ext.composites.TransformerComposite
        E.g. ``LanguageTransformer(attention='cp')``.
    layers : sequence of str or dict of str to Concept
        As :class:`ReferenceJob`'s.
    out : str
        The output folder.
    text : sequence of str
        UTF-8 text files.
    window : int, optional
        Tokens per window (default 64).
    k, units, max_target, abs_norm, identity, taps, batch_size, device, resume, progress, writers
        As :class:`ReferenceJob`'s (``batch_size``: windows per batch).
    before, after : int, optional
        Tokens shown before and after the top token on the pages (default 12 and 4).
    label_window : int, optional
        Tokens before the top token (and the top token) that the labels count n-grams in (default 2).
    """

    verb, unit = 'searching', 'win'

    def __init__(self, model, tokenizer, composite, layers, out, text, window=64, k=8, units=None, max_target='sum',
                 abs_norm=True, identity=None, taps=None, batch_size=16, device='cpu', resume=True, progress=True,
                 writers=1, before=12, after=4, label_window=2):
        from ..composites.transformer import TransformerComposite

        if not isinstance(composite, TransformerComposite):
            raise TypeError(f'reference text spans need a transformer composite (lxt_ext.composites.'
                            f'LanguageTransformer), got {type(composite).__name__}')
        if isinstance(text, str):
            text = [text]
        if not text:
            raise ValueError('no text files given')
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f'k must be a positive integer, got {k!r}')
        if max_target not in MAX_TARGETS:
            raise ValueError(f'max_target must be one of {MAX_TARGETS}, got {max_target!r}')
        for name, value in (('batch_size', batch_size), ('writers', writers)):
            if value < 1:
                raise ValueError(f'{name} must be positive, got {value}')
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f'window must be an integer of at least 2 tokens, got {window!r}')
        BatchJob.__init__(self, out, batch_size, device, resume, progress, writers)
        self.model, self.tokenizer, self.composite = model, tokenizer, composite
        self.forward = lambda model, x: model(inputs_embeds=x)
        self.text, self.window, self.k = [str(t) for t in text], window, k
        self.max_target, self.abs_norm = max_target, bool(abs_norm)
        self.identity, self.classes, self.generate = dict(identity or {}), None, None
        self.before, self.after, self.label_window = before, after, label_window
        self.target = 'next-token logits'
        self._windows = None
        self.layer_map, self.taps = self._layers(layers, taps)
        self.shapes = self._probe()
        self.units = self._units(units)

    def _probe_input(self):
        embedding = self.model.get_input_embeddings()
        ids = torch.zeros(1, self.window, dtype=torch.int64, device=embedding.weight.device)
        return embedding(ids).detach()

    def _class_token(self, layer):
        return False

    def _corpus(self):
        if self._windows is None:
            self._windows = token_windows(self.text, self.tokenizer, self.window)
        return self._windows

    def recorded(self):
        ids, _, info = self._corpus()
        layers = {name: ranges(self.units[name]) for name in self.layer_map}
        return dict(self.identity, kind='text references', layers=layers, k=self.k, max_target=self.max_target,
                    abs_norm=self.abs_norm, target=self.target, batch_size=self.batch_size, window=self.window,
                    windows=len(ids), text=[{'sha256': i['sha256'], 'tokens': i['tokens']} for i in info])

    def items(self):
        _, starts, info = self._corpus()
        paths = [os.path.abspath(i['path']) for i in info]
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
        return root, [f'{os.path.relpath(paths[f], root)}#{start}' for f, start in starts]

    def load(self, root, names, spans):
        ids = self._corpus()[0]
        return ((span, torch.from_numpy(ids[span].astype('int64'))) for span in spans)

    def compute(self, explainer, batch, indices, loaded, names):
        done, ids = loaded
        embedding = self.model.get_input_embeddings()
        ids = ids.to(embedding.weight.device)
        x = embedding(ids).detach().to(self._dtype)
        explanation = explainer(x, next_token_seed(ids))
        part = {}
        index = torch.tensor(done, dtype=torch.int64)[:, None]
        for name, concept in self.layer_map.items():
            columns = torch.tensor(self.units[name])
            for mode, tensor in (('relevance', explanation.latent[name]), ('activation', self._outputs[name])):
                tensor = tensor.detach().float().cpu()
                values, tokens = unit_values(concept, tensor, self.max_target, self.abs_norm)
                part[f'{name}\t{mode}'] = top_k(values[:, columns], index.expand(-1, len(columns)), self.k,
                                                 tokens[:, columns].long(), tokens[:, columns].long())
        self._outputs = {}
        score = explanation.score.float().cpu()
        rows = [{'path': names[i], 'image': i, 'label': None, 'explained': None, 'logit': float(score[j])}
                for j, i in enumerate(done)]
        return (rows, part), len(done), []

    def _settings_lines(self):
        ids, _, info = self._corpus()
        composite = self.identity.get('composite', type(self.composite).__name__)
        files = ', '.join(f'{i["path"]} ({i["tokens"]:,} tokens)' for i in info)
        return [f'model: {self.identity.get("model", type(self.model).__name__)}, composite: {composite}',
                f'text: {files}; {len(ids):,} windows of {self.window} tokens (stride {self.window}, each file\'s '
                f'last partial window dropped)',
                f'each window explained for the sum over its positions of the logit of the next token; a unit\'s '
                f'value: its relevance (a * g at the layer output) or activation '
                f'{"summed over" if self.max_target == "sum" else "at the largest of"} the positions'
                + (', divided by the window\'s summed |value| over the layer\'s units' if self.abs_norm else ''),
                f'top {self.k} windows per unit and mode, ties to the smaller window index; highlighted: the unit\'s '
                f'top token (its largest value in the window); label: the n-gram (1 or 2 tokens) in the most spans '
                f'of the {self.label_window} tokens before the top token and the top token, with its share of the '
                f'spans']

    def _render(self, root, layers):
        from ..concepts.labels import label_text_units
        from ..visualization.references import index_page, text_layer_page

        ids = self._corpus()[0]
        special = set(getattr(self.tokenizer, 'all_special_ids', []) or [])
        settings = self._settings_lines()
        front = []
        for name, entry in layers.items():
            units = entry['units']
            labels, spans = {}, {}
            for mode in MODES:
                refs = [entry[mode][str(u)] for u in units]
                ranks = min(map(len, refs))
                wanted = sorted({row['image'] for rows in refs for row in rows})
                local = {w: j for j, w in enumerate(wanted)}
                indices = torch.tensor([[local[rows[r]['image']] for rows in refs] for r in range(ranks)],
                                       dtype=torch.int64).view(ranks, len(units))
                tokens = torch.tensor([[rows[r]['token'] for rows in refs] for r in range(ranks)],
                                      dtype=torch.int64).view(ranks, len(units))
                found = label_text_units(indices, tokens, [[int(t) for t in ids[w]] for w in wanted], window=(
                    self.label_window, 0), tokenizer=self.tokenizer, exclude=special) if ranks else []
                labels[mode] = {str(u): {'label': found[j].label if found else None,
                                         'purity': found[j].purity if found else 0.0}
                                for j, u in enumerate(units)}
                spans[mode] = {str(u): [self._span(row) for row in entry[mode][str(u)]] for u in units}
            entry['labels'] = labels
            folder = os.path.join('layers', _file_name(name))
            text = text_layer_page(name, units, {mode: entry[mode] for mode in MODES}, spans, labels,
                                   settings).encode()
            atomic_write(self.folder.path(folder, 'index.html'), lambda f, t=text: f.write(t))
            front.append((name, f'{folder}/index.html', len(units), {}))
        text = index_page('Reference text spans', settings, front).encode()
        atomic_write(self.folder.path('index.html'), lambda f: f.write(text))

    def _span(self, row):
        """``(before, top, after)``: the decoded tokens around a reference's top token."""
        ids = [int(t) for t in self._corpus()[0][row['image']]]
        token, first = row['token'], max(0, row['token'] - self.before)
        decode = self.tokenizer.decode
        before, upto = decode(ids[first:token]), decode(ids[first:token + 1])
        whole = decode(ids[first:token + 1 + self.after])
        if upto.startswith(before) and whole.startswith(upto):  # the spacing of the decoded text kept
            return [before], upto[len(before):], [whole[len(upto):]]
        return ([decode([t]) for t in ids[first:token]], decode([ids[token]]),
                [decode([t]) for t in ids[token + 1:token + 1 + self.after]])
