"""The models the command line explains, each with the input size and normalisation it expects, and the
composites that fit them.

Model specs: ``embedded`` (lxt_ext's trained default, offline); a torchvision classification model name
(``vit_b_16``, ``resnet50``, ...; ``--weights`` a local state_dict file, else random weights with a
warning); ``timm:<name>`` (``--weights`` a local checkpoint); or a local Hugging Face model folder (ViT,
DeiT, ...: ``config.json`` and weights, read with ``local_files_only``). Nothing is ever downloaded.
"""
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field

import torch

from .. import composites, rules
from ..job.outputs import file_sha256

# torchvision's ImageNet normalisation
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

# the image composites of lxt_ext's one name table
CNN_COMPOSITES = {name: cls for name, cls in composites.NAMES.items()
                  if not issubclass(cls, composites.TransformerComposite)}
VIT_COMPOSITES = {name: cls for name, cls in composites.NAMES.items() if name.startswith('vit_')}
COMPOSITES = {**CNN_COMPOSITES, **VIT_COMPOSITES}
# composite parameters the command line passes on (flag dest -> keyword); each composite takes a subset
PARAMETERS = ('epsilon', 'gamma', 'conv_gamma', 'linear_gamma', 'stabilizer', 'attention', 'first_rule')
FIRST_RULES = ('zbox', 'flat', 'wsquare', 'epsilon', 'gamma', 'zplus')


class ModelError(ValueError):
    """A model spec or weights file that cannot give a model (named in the message)."""


@dataclass
class LoadedModel:
    """A model the command line explains, with what its inputs must be.

    Parameters
    ----------
    model : torch.nn.Module
        The model, in eval mode.
    size : int
        Its input images are ``size x size``.
    mean, std : tuple of float
        Its per-channel normalisation of images in 0..1.
    transformer : bool
        Whether it has attention layers (the ``vit_*`` composites fit it), else the CNN composites do.
    identity : dict
        What identifies it in the run settings: spec, weights' checksum, seed of random weights.
    canonizer : type, optional
        The zennit canonizer class the CNN composites use on it (VGG, ResNet).
    forward : callable, optional
        ``forward(model, x) -> logits`` where ``model(x)`` does not give the logits (Hugging Face).
    notes : list of str
        Warnings for the user, e.g. that the weights are random.
    """

    model: torch.nn.Module
    size: int
    mean: tuple
    std: tuple
    transformer: bool
    identity: dict                       # what identifies it in the run settings
    canonizer: object = None             # zennit canonizer class for CNN composites
    forward: object = None               # forward(model, x) -> logits, if not model(x)
    notes: list = field(default_factory=list)

    def normalise(self, images):
        """The model's input of images in 0..1.

        Parameters
        ----------
        images : torch.Tensor
            (N, C, H, W) in 0..1.

        Returns
        -------
        torch.Tensor
            ``(images - mean) / std`` per channel, on the images' device and in their dtype.
        """
        mean = torch.as_tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std


def is_transformer(model):
    """Whether ``model`` has attention layers (so the ``vit_*`` composites, not the CNN ones, fit it).

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    bool
        True when a module is a ``MultiheadAttention`` or its class name holds ``Attention``.
    """
    return any(isinstance(m, torch.nn.MultiheadAttention) or 'Attention' in type(m).__name__
               for m in model.modules())


def _weights_identity(weights):
    if weights is None:
        return None
    if not os.path.isfile(weights):
        raise ModelError(f'no such weights file: {weights}')
    return file_sha256(weights)


def _state_dict(weights):
    try:
        state = torch.load(weights, map_location='cpu', weights_only=True)
    except Exception as error:  # noqa: BLE001 (any unpickling failure: a damaged or foreign file)
        raise ModelError(f'cannot read the weights file {weights}: {error}') from None
    if isinstance(state, dict) and 'state_dict' in state and isinstance(state['state_dict'], dict):
        state = state['state_dict']
    if not isinstance(state, dict):
        raise ModelError(f'{weights} holds a {type(state).__name__}, not a state_dict')
    return state


def _load_state(model, weights, spec):
    try:
        model.load_state_dict(_state_dict(weights))
    except RuntimeError as error:
        raise ModelError(f'the weights in {weights} do not fit {spec}: {str(error).splitlines()[0]}') from None


def load_embedded():
    """lxt_ext's embedded default model (a small trained ViT, shipped in the package).

    Returns
    -------
    LoadedModel
        The model with its input size, normalisation and weights' checksum.
    """
    from ..data import embedded

    model = embedded.load_model()
    return LoadedModel(model, embedded.IMAGE_SIZE, tuple(embedded.MEAN.flatten().tolist()),
                       tuple(embedded.STD.flatten().tolist()), True,
                       {'model': 'embedded', 'weights': embedded.WEIGHTS_SHA256})


def load_torchvision(name, weights=None, seed=0):
    """A torchvision classification model.

    Parameters
    ----------
    name : str
        The model's name in ``torchvision.models`` (``vit_b_16``, ``resnet50``, ...).
    weights : str, optional
        A local state_dict file; without it the weights are random (with a note saying so).
    seed : int, optional
        The seed of random weights.

    Returns
    -------
    LoadedModel
        The model, with the canonizer of VGGs and ResNets.

    Raises
    ------
    ModelError
        When torchvision has no such model, or the weights file is missing, unreadable or does not fit.
    """
    import torchvision
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ModelError(f'unknown model {name!r}: give "embedded", a torchvision classification model '
                         f'({", ".join(sorted(available)[:8])}, ...), "timm:<name>" or a local Hugging Face folder')
    identity = {'model': f'torchvision:{name}', 'weights': _weights_identity(weights)}
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    notes = []
    if weights is not None:
        _load_state(model, weights, name)
    else:
        identity['seed'] = seed
        notes.append(f'{name} has random weights (seed {seed}): give --weights to explain a trained model')
        heads = getattr(model, 'heads', None)
        if heads is not None and hasattr(heads, 'head'):
            # torchvision zero-initialises a ViT's head: every logit and relevance would be 0
            torch.nn.init.normal_(heads.head.weight, std=0.02)
    size = int(getattr(model, 'image_size', 224))
    canonizer = VGGCanonizer if name.startswith('vgg') else ResNetCanonizer if name.startswith('resnet') else None
    return LoadedModel(model.eval(), size, IMAGENET_MEAN, IMAGENET_STD, is_transformer(model), identity,
                       canonizer=canonizer, notes=notes)


def load_timm(name, weights=None):
    """A timm model, built without downloading anything.

    Parameters
    ----------
    name : str
        The model's name in timm.
    weights : str, optional
        A local checkpoint; without it the weights are random (with a note saying so).

    Returns
    -------
    LoadedModel
        The model with the input size and normalisation of its ``pretrained_cfg``.

    Raises
    ------
    ModelError
        When timm is not installed, has no such model, or the weights file does not fit.
    """
    try:
        import timm
    except ImportError:
        raise ModelError('timm models need timm installed (pip install timm)') from None
    identity = {'model': f'timm:{name}', 'weights': _weights_identity(weights)}
    if name not in timm.list_models():
        raise ModelError(f'timm has no model {name!r}')
    model = timm.create_model(name, pretrained=False)
    notes = []
    if weights is not None:
        _load_state(model, weights, f'timm:{name}')
    else:
        notes.append(f'timm:{name} has random weights: give --weights to explain a trained model')
    config = model.pretrained_cfg
    size = int(config.get('input_size', (3, 224, 224))[-1])
    return LoadedModel(model.eval(), size, tuple(config.get('mean', IMAGENET_MEAN)),
                       tuple(config.get('std', IMAGENET_STD)), is_transformer(model), identity, notes=notes)


def load_huggingface(folder):
    """A local Hugging Face image classifier (read with ``local_files_only``).

    Parameters
    ----------
    folder : str
        A folder with ``config.json``, the weights and optionally ``preprocessor_config.json``.

    Returns
    -------
    LoadedModel
        The model with the input size and normalisation of its preprocessor (0.5 / 0.5 without one) and
        a ``forward`` that returns the logits.

    Raises
    ------
    ModelError
        When transformers is not installed or the folder holds no loadable model.
    """
    try:
        from transformers import AutoModelForImageClassification
    except ImportError:
        raise ModelError('Hugging Face models need transformers installed (pip install transformers)') from None
    if not os.path.isfile(os.path.join(folder, 'config.json')):
        raise ModelError(f'{folder} is no Hugging Face model folder (no config.json)')
    try:
        # use_kernels=False: offline, no kernels fetched from the Hub (transformers 5.25 asks for them by default)
        model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True, use_kernels=False)
    except (OSError, ValueError) as error:
        raise ModelError(f'cannot load the Hugging Face model in {folder}: {error}') from None
    processor = {}
    path = os.path.join(folder, 'preprocessor_config.json')
    if os.path.isfile(path):
        with open(path, encoding='utf-8') as file:
            processor = json.load(file)
    size = processor.get('size', model.config.image_size)
    if isinstance(size, dict):
        size = size.get('height', size.get('shortest_edge', model.config.image_size))
    weights = sorted(f for f in os.listdir(folder) if f.endswith(('.safetensors', '.bin')))
    identity = {'model': f'huggingface:{os.path.realpath(folder)}',
                'weights': [file_sha256(os.path.join(folder, f)) for f in weights]}
    return LoadedModel(model.eval(), int(size), tuple(processor.get('image_mean', (0.5, 0.5, 0.5))),
                       tuple(processor.get('image_std', (0.5, 0.5, 0.5))), True, identity,
                       forward=lambda model, x: model(pixel_values=x).logits)


def load_model(spec, weights=None, seed=0):
    """The model of a model spec (see the module doc).

    Parameters
    ----------
    spec : str
        ``embedded``, a torchvision model's name, ``timm:<name>`` or a local Hugging Face folder.
    weights : str, optional
        A local weights file for torchvision and timm models.
    seed : int, optional
        The seed of random weights (torchvision models without ``weights``).

    Returns
    -------
    LoadedModel
        The model with its input size and normalisation.

    Raises
    ------
    ModelError
        Naming what is wrong with the spec or the weights.
    """
    if spec == 'embedded':
        if weights is not None:
            raise ModelError('the embedded model has its own weights; --weights is for the other models')
        return load_embedded()
    if spec.startswith('timm:'):
        return load_timm(spec[len('timm:'):], weights)
    if os.path.isdir(spec):
        return load_huggingface(spec)
    if os.sep in spec or spec.startswith('.'):
        raise ModelError(f'no such model folder: {spec}')
    return load_torchvision(spec, weights, seed)


def default_composite(loaded):
    """The composite the commands use when none is named.

    Parameters
    ----------
    loaded : LoadedModel
        The model.

    Returns
    -------
    str
        ``'vit_gamma'`` for a transformer, else ``'epsilon_gamma_box'``.
    """
    return 'vit_gamma' if loaded.transformer else 'epsilon_gamma_box'


def first_rule(name, loaded, gamma=None):
    """The rule of the first layer named by ``--first-rule``.

    Parameters
    ----------
    name : str
        One of :data:`FIRST_RULES`.
    loaded : LoadedModel
        The model; its normalisation gives ZBox the bounds of images in 0..1.
    gamma : float, optional
        The gamma of the ``gamma`` rule (default 0.25).

    Returns
    -------
    object
        The rule (of ``lxt_ext.rules``, or zennit's ``WSquare``), to be placed on the first layer.

    Raises
    ------
    ValueError
        When ``name`` is none of :data:`FIRST_RULES`.
    """
    low = tuple((0. - m) / s for m, s in zip(loaded.mean, loaded.std))
    high = tuple((1. - m) / s for m, s in zip(loaded.mean, loaded.std))
    if name == 'zbox':
        return rules.ZBox(low=torch.tensor(low).view(1, 3, 1, 1), high=torch.tensor(high).view(1, 3, 1, 1))
    if name == 'flat':
        return rules.Flat()
    if name == 'wsquare':
        from zennit.rules import WSquare
        return WSquare()
    if name == 'epsilon':
        return rules.Epsilon()
    if name == 'gamma':
        return rules.Gamma(gamma=0.25 if gamma is None else gamma)
    if name == 'zplus':
        return rules.ZPlus()
    raise ValueError(f'first rule must be one of {FIRST_RULES}, got {name!r}')


def build_composite(name, loaded, parameters):
    """The composite ``name`` on ``loaded`` with the given parameters.

    Parameters
    ----------
    name : str
        A composite of :data:`COMPOSITES`.
    loaded : LoadedModel
        The model (its kind decides which composites fit; its canonizer and normalisation complete the
        CNN composites).
    parameters : dict
        Values of :data:`PARAMETERS` (None: not set).

    Returns
    -------
    composite : zennit.core.Composite
        The composite.
    description : dict
        The composite's name and the parameters set, as the run settings record them.

    Raises
    ------
    ValueError
        When the composite is unknown, does not fit the model or does not take a parameter.
    """
    fits = VIT_COMPOSITES if loaded.transformer else CNN_COMPOSITES
    kind = 'a transformer' if loaded.transformer else 'a CNN (no attention)'
    if name not in COMPOSITES:
        raise ValueError(f'unknown composite {name!r}; choose one of {sorted(COMPOSITES)}')
    if name not in fits:
        raise ValueError(f'composite {name!r} does not fit {loaded.identity["model"]}, which is {kind}; '
                         f'choose one of {sorted(fits)}')
    cls = COMPOSITES[name]
    accepted = inspect.signature(cls).parameters
    given = {k: v for k, v in parameters.items() if v is not None}
    refused = sorted(k for k in given if k not in accepted)
    if refused:
        takes = sorted(k for k in PARAMETERS if k in accepted)
        raise ValueError(f'composite {name!r} takes no {", ".join("--" + k.replace("_", "-") for k in refused)}; '
                         f'it takes {", ".join("--" + k.replace("_", "-") for k in takes) or "no parameters"}')
    kwargs = dict(given)
    if 'first_rule' in kwargs:
        kwargs['first_rule'] = first_rule(kwargs['first_rule'], loaded, given.get('conv_gamma'))
    if cls in CNN_COMPOSITES.values():
        if loaded.canonizer is not None:
            kwargs['canonizers'] = [loaded.canonizer()]
        if name == 'epsilon_gamma_box':
            bounds = first_rule('zbox', loaded)
            kwargs.update(low=bounds.low, high=bounds.high)
    return cls(**kwargs), {'composite': name, **given}


def fit_warnings(loaded):
    """Warn of what the user should know about the model (random weights, ...).

    Parameters
    ----------
    loaded : LoadedModel
        The model, whose ``notes`` are issued as warnings.
    """
    for note in loaded.notes:
        warnings.warn(note)
