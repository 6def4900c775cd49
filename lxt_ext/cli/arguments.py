"""The command line's arguments."""
import argparse

from .models import COMPOSITES, MODELS

DESCRIPTION = 'attribute images with a CNN or a Vision Transformer and write heatmap PNGs'


def parser():
    """``python -m lxt_ext``'s parser; nothing is downloaded (random seeded weights unless ``--weights``)."""
    parser = argparse.ArgumentParser(prog='python -m lxt_ext', description=DESCRIPTION)
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
    return parser
