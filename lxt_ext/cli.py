"""``python -m lxt_ext``: attribute images with a CNN or a Vision Transformer and write heatmap PNGs.

Offline by design: the model is built from torchvision with random weights (seeded) unless
``--weights`` names a local state_dict file; without ``--input`` an embedded synthetic image is used.
CNNs get zennit's LRP composites with lxt_ext's fused rules; ViTs lxt_ext's attention-aware
composites (``vit_gamma``: LXT's published recipe, CP-LRP with gamma; ``vit_epsilon``: AttnLRP).
"""
import argparse
import os
import sys

import torch

from . import composites as lxt_composites
from . import transformer_composites
from .sample import load_images, sample_image

CNNS = ('vgg16', 'vgg11', 'resnet18', 'resnet50')
VITS = ('vit_b_16', 'vit_b_32')
MODELS = CNNS + VITS
CNN_COMPOSITES = {
    'epsilon_gamma_box': lxt_composites.EpsilonGammaBox,
    'epsilon_plus': lxt_composites.EpsilonPlus,
    'epsilon_alpha2_beta1': lxt_composites.EpsilonAlpha2Beta1,
    'epsilon_plus_flat': lxt_composites.EpsilonPlusFlat,
    'epsilon_alpha2_beta1_flat': lxt_composites.EpsilonAlpha2Beta1Flat,
}
VIT_COMPOSITES = {
    'vit_gamma': transformer_composites.ViTGamma,
    'vit_epsilon': transformer_composites.ViTEpsilon,
}
COMPOSITES = {**CNN_COMPOSITES, **VIT_COMPOSITES}
# torchvision's ImageNet normalisation: pixel bounds 0..1 map to these per-channel bounds (ZBox).
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def build_model(name, weights=None, seed=0):
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
    fits = VIT_COMPOSITES if model_name in VITS else CNN_COMPOSITES
    if name not in fits:
        raise ValueError(f'composite {name!r} does not fit {model_name}; choose one of {sorted(fits)}')
    if name in VIT_COMPOSITES:
        return VIT_COMPOSITES[name]()
    kwargs = {'canonizers': [canonizer()]}
    if name == 'epsilon_gamma_box':
        kwargs.update(low=(0. - MEAN) / STD, high=(1. - MEAN) / STD)
    return COMPOSITES[name](**kwargs)


def attribute(model, composite, images, target=None, batch_size=8, progress=True):
    """Relevance of ``images`` (N x 3 x H x W in 0..1) for ``target`` (default: each image's top class)."""
    from tqdm import tqdm
    from zennit.attribution import Gradient

    results = []
    batches = range(0, len(images), batch_size)
    with Gradient(model, composite) as attributor:
        for start in tqdm(batches, desc='attributing', unit='batch', disable=not progress, file=sys.stderr):
            x = (images[start:start + batch_size] - MEAN) / STD
            with torch.no_grad():
                logits = model(x)
            classes = logits.argmax(1) if target is None else torch.full((len(x),), target)
            onehot = torch.nn.functional.one_hot(classes, logits.shape[1]).to(x)
            _, relevance = attributor(x, onehot)
            results.append((relevance.sum(1), classes))
    relevance = torch.cat([r for r, _ in results])
    return relevance, torch.cat([c for _, c in results])


def save_heatmap(relevance, image, path):
    """Input and heatmap side by side (zennit's coldnhot colour map, symmetric around zero)."""
    from PIL import Image
    from zennit.image import CMAPS

    relevance = relevance.detach().double()
    scaled = (relevance / relevance.abs().max().clamp(min=1e-30) + 1) / 2
    heat = torch.as_tensor(CMAPS['coldnhot'](scaled.numpy()))
    pixels = torch.cat([image.permute(1, 2, 0).double(), heat], dim=1)
    Image.fromarray((pixels.clamp(0, 1) * 255).round().byte().numpy()).save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m lxt_ext', description=__doc__.split('\n')[0])
    parser.add_argument('--model', choices=MODELS, default='vgg16')
    parser.add_argument('--composite', choices=sorted(COMPOSITES),
                        help='default: epsilon_gamma_box for CNNs, vit_gamma for ViTs')
    parser.add_argument('--weights', help='local state_dict file (default: random weights, seeded)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--input', nargs='*', help='image files or folders (default: an embedded synthetic image)')
    parser.add_argument('--size', type=int, default=224, help='images are resized to size x size')
    parser.add_argument('--target', type=int, help='class to explain (default: the top class of each image)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--out', default='heatmap.png',
                        help='output PNG; with several images, a folder that receives one PNG per image')
    parser.add_argument('--threads', type=int, help='torch CPU threads')
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.input:
        names, images = load_images(args.input, args.size)
    else:
        names, images = ['sample'], sample_image(args.size)[None]
    if args.model in VITS and args.size != 224:
        parser.error(f'{args.model} takes 224 x 224 images (--size 224)')
    model, canonizer = build_model(args.model, args.weights, args.seed)
    default = 'vit_gamma' if args.model in VITS else 'epsilon_gamma_box'
    try:
        composite = build_composite(args.composite or default, canonizer, args.model)
    except ValueError as error:
        parser.error(str(error))
    relevance, classes = attribute(model, composite, images, args.target, args.batch_size)

    if len(images) == 1:
        paths = [args.out]
    else:
        os.makedirs(args.out, exist_ok=True)
        paths = [os.path.join(args.out, f'{os.path.splitext(os.path.basename(n))[0]}_heatmap.png') for n in names]
    for rel, image, cls, path, name in zip(relevance, images, classes, paths, names):
        save_heatmap(rel, image, path)
        print(f'{name}: class {int(cls)}, total relevance {float(rel.sum()):.4g} -> {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
