"""The seeded random-weight models that the benchmarks measure, and the runs measured on them.

A run is a callable doing one attribution and returning it; whatever it needs besides (the composite,
the input) is made before, so that a timing or a memory peak covers the attribution alone.
"""
import torch


def cnn(name, seed=0):
    """``(model, canonizer class)``: torchvision's ``name`` (vgg*, resnet*) with random weights drawn
    after ``torch.manual_seed(seed)``, in eval mode, and zennit's canonizer for it."""
    import torchvision
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)().eval()
    return model, VGGCanonizer if name.startswith('vgg') else ResNetCanonizer


def vit(small=False, seed=0):
    """torchvision's vit_b_16 (``small``: a 2-layer VisionTransformer on 32 x 32 images, for smoke tests)
    with random weights drawn after ``torch.manual_seed(seed)``, in eval mode. torchvision
    zero-initialises the classification head, which would make every logit and relevance 0: it is
    drawn anew (std 0.03). Build it after any patching of ``torchvision.models.vision_transformer``."""
    import torchvision

    torch.manual_seed(seed)
    if small:
        model = torchvision.models.VisionTransformer(32, 8, 2, 4, 32, 64)
    else:
        model = torchvision.models.vit_b_16()
    model.eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.03)
    return model


def plain(model, x, target):
    """The floor: one forward+backward, the gradient of ``target``-weighted outputs w.r.t. ``x``."""
    def run():
        xg = x.clone().requires_grad_()
        return torch.autograd.grad(model(xg), xg, target)[0]
    return run


def attribution(model, composite, x, target):
    """zennit's Gradient attributor with ``composite`` (registered and removed inside each run):
    the relevance of ``target`` at ``x``."""
    from zennit.attribution import Gradient

    def run():
        with Gradient(model, composite) as attributor:
            return attributor(x, target)[1]
    return run


def epsilon_gamma_box(model, canonizer, x, target):
    """``{'plain', 'zennit', 'lxt_ext'}`` runs: plain forward+backward, zennit's and lxt_ext's
    EpsilonGammaBox (low=-3, high=3, a fresh ``canonizer()`` each)."""
    import zennit.composites

    import lxt_ext.composites

    def composite(module):
        return module.EpsilonGammaBox(low=-3., high=3., canonizers=[canonizer()])
    return {'plain': plain(model, x, target),
            'zennit': attribution(model, composite(zennit.composites), x, target),
            'lxt_ext': attribution(model, composite(lxt_ext.composites), x, target)}
