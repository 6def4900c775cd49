"""The models the command line explains and the composite fitting each: torchvision CNNs with zennit's
LRP composites (lxt_ext's fused rules) and canonizers, torchvision ViTs with lxt_ext's attention-aware
composites (``vit_gamma``: LXT's published recipe, CP-LRP with gamma; ``vit_epsilon``: AttnLRP)."""
import torch

from .. import composites

CNNS = ('vgg16', 'vgg11', 'resnet18', 'resnet50')
VITS = ('vit_b_16', 'vit_b_32')
MODELS = CNNS + VITS
CNN_COMPOSITES = {
    'epsilon_gamma_box': composites.EpsilonGammaBox,
    'epsilon_plus': composites.EpsilonPlus,
    'epsilon_alpha2_beta1': composites.EpsilonAlpha2Beta1,
    'epsilon_plus_flat': composites.EpsilonPlusFlat,
    'epsilon_alpha2_beta1_flat': composites.EpsilonAlpha2Beta1Flat,
}
VIT_COMPOSITES = {
    'vit_gamma': composites.ViTGamma,
    'vit_epsilon': composites.ViTEpsilon,
}
COMPOSITES = {**CNN_COMPOSITES, **VIT_COMPOSITES}
# torchvision's ImageNet normalisation: pixel bounds 0..1 map to these per-channel bounds (ZBox).
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def default_composite(model_name):
    return 'vit_gamma' if model_name in VITS else 'epsilon_gamma_box'


def build_model(name, weights=None, seed=0):
    """``(model in eval mode, zennit canonizer class or None)``: torchvision's ``name`` with random
    weights drawn after ``torch.manual_seed(seed)``, or the state_dict in the file ``weights``."""
    import torchvision
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location='cpu', weights_only=True))
    elif name in VITS:
        # torchvision zero-initialises the classification head: all logits and relevance would be 0
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    if name in VITS:
        return model.eval(), None
    canonizer = VGGCanonizer if name.startswith('vgg') else ResNetCanonizer
    return model.eval(), canonizer


def build_composite(name, canonizer, model_name='vgg16'):
    """The composite ``name`` for ``model_name``; CNN composites get ``canonizer()``, and ZBox's
    bounds are the normalised pixel bounds 0 and 1."""
    fits = VIT_COMPOSITES if model_name in VITS else CNN_COMPOSITES
    if name not in fits:
        raise ValueError(f'composite {name!r} does not fit {model_name}; choose one of {sorted(fits)}')
    if name in VIT_COMPOSITES:
        return VIT_COMPOSITES[name]()
    kwargs = {'canonizers': [canonizer()]}
    if name == 'epsilon_gamma_box':
        kwargs.update(low=(0. - MEAN) / STD, high=(1. - MEAN) / STD)
    return COMPOSITES[name](**kwargs)
