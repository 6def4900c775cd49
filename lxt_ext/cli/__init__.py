"""``python -m lxt_ext`` (console script ``lxt-ext``): attribute images with a CNN or a Vision
Transformer and write heatmap PNGs, input and heatmap side by side.

Offline by design: the model is built from torchvision with random weights (seeded) unless
``--weights`` names a local state_dict file; without ``--input`` an embedded synthetic image is used.
``arguments`` parses, ``models`` builds the model and its composite, ``loop`` attributes.
"""
import os

import torch

from ..data import load_images, sample_image
from ..visualization import save_heatmap
from .arguments import parser
from .loop import attribute
from .models import MEAN, STD, VITS, build_composite, build_model, default_composite

__all__ = ['main', 'attribute', 'build_model', 'build_composite', 'MEAN', 'STD']


def output_paths(out, names):
    """``out`` itself for one image; for several, ``out/<name>_heatmap.png`` each (folder made)."""
    if len(names) == 1:
        return [out]
    os.makedirs(out, exist_ok=True)
    return [os.path.join(out, f'{os.path.splitext(os.path.basename(n))[0]}_heatmap.png') for n in names]


def main(argv=None):
    arguments = parser()
    args = arguments.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.input:
        names, images = load_images(args.input, args.size)
    else:
        names, images = ['sample'], sample_image(args.size)[None]
    if args.model in VITS and args.size != 224:
        arguments.error(f'{args.model} takes 224 x 224 images (--size 224)')
    model, canonizer = build_model(args.model, args.weights, args.seed)
    try:
        composite = build_composite(args.composite or default_composite(args.model), canonizer, args.model)
    except ValueError as error:
        arguments.error(str(error))
    relevance, classes = attribute(model, composite, images, args.target, args.batch_size)
    for rel, image, cls, path, name in zip(relevance, images, classes, output_paths(args.out, names), names):
        save_heatmap(rel, path, image=image)
        print(f'{name}: class {int(cls)}, total relevance {float(rel.sum()):.4g} -> {path}')
    return 0

