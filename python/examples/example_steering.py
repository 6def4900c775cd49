"""Steering on the embedded model: suppress the MLP neurons most relevant to each image's class and compare the
class logit and the heatmap with suppressing as many random neurons (offline, a few seconds).

    python python/examples/example_steering.py [--out example_steering] [--k 8] [--draws 10]

For each of the 12 shipped samples: ``most_relevant_units`` gives the k neurons of the last block's MLP
(``encoder_layer_3.mlp.1``, 128 neurons) with the highest relevance for the labelled class (ViTGamma, CP-LRP);
``steer`` sets them to 0 and the image is explained again, steered. The same is done with k random neurons
(``--draws`` draws; the heatmap shows the first). Printed: the label's logit before, with the relevant neurons
suppressed, with random ones (mean over the draws). Written: ``<out>/steering.png``, one row per image: the
image, then the heatmaps before, after suppressing the relevant neurons and after suppressing random ones, on one
colour scale per row (so a weaker heatmap looks paler), and last the heatmap before minus the heatmap with the
relevant neurons suppressed (its own scale: where the suppression took relevance away).
"""
import argparse
import os

import torch

from lxt_ext.attribution import explain_batch
from lxt_ext.composites import ViTGamma
from lxt_ext.concepts import most_relevant_units, steer
from lxt_ext.data import embedded
from lxt_ext.visualization.image import imgify, to_pil

LAYER = 'encoder.layers.encoder_layer_3.mlp.1'


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='example_steering')
    parser.add_argument('--k', type=int, default=8)
    parser.add_argument('--draws', type=int, default=10)
    args = parser.parse_args()

    from PIL import Image

    torch.set_num_threads(1)  # a 0.6 MB model: threads only wait on each other (and on a busy machine, spin)
    model = embedded.load_model()
    images, _, labels, names = embedded.load_samples()
    x = (images - embedded.MEAN) / embedded.STD
    width = dict(model.named_modules())[LAYER.rpartition('.')[0]][0].out_features
    generator = torch.Generator().manual_seed(0)
    rows, drops = [], {'relevant': [], 'random': []}
    print(f'{"image":<16} {"class":<9} {"logit":>7} {"top-k off":>10} {"random off":>11}')
    for i, name in enumerate(names):
        row, target = x[i:i + 1], labels[i:i + 1]
        top = most_relevant_units(model, row, ViTGamma(), LAYER, target=target, k=args.k)
        before = explain_batch(model, row, ViTGamma(), target=target)
        with steer(model, {LAYER: (top.units, 0.0)}):
            relevant = explain_batch(model, row, ViTGamma(), target=target)
        random_scores, random_heatmap = [], None
        for draw in range(args.draws):
            units = torch.randperm(width, generator=generator)[:args.k]
            with steer(model, {LAYER: (units, 0.0)}):
                e = explain_batch(model, row, ViTGamma(), target=target)
            random_scores.append(float(e.score[0]))
            if draw == 0:
                random_heatmap = e.relevance[0].sum(0)
        base, off, random_off = float(before.score[0]), float(relevant.score[0]), sum(random_scores) / args.draws
        drops['relevant'].append(base - off)
        drops['random'].append(base - random_off)
        print(f'{name:<16} {embedded.CLASSES[int(target)]:<9} {base:7.3f} {off:10.3f} {random_off:11.3f}')
        heatmaps = torch.cat([before.relevance[0].sum(0), relevant.relevance[0].sum(0), random_heatmap], dim=1)
        picture = to_pil(images[i].permute(1, 2, 0).numpy())
        change = before.relevance[0].sum(0) - relevant.relevance[0].sum(0)
        strip = Image.new('RGB', (picture.width * 5, picture.height))
        strip.paste(picture, (0, 0))
        strip.paste(imgify(heatmaps), (picture.width, 0))   # one colour scale for the three heatmaps
        strip.paste(imgify(change), (picture.width * 4, 0))  # what the suppressed neurons' removal took away
        rows.append(strip)
    mean = {key: sum(value) / len(value) for key, value in drops.items()}
    print(f'mean drop of the label logit over {len(names)} images: top-{args.k} relevant neurons suppressed '
          f'{mean["relevant"]:.3f}, {args.k} random neurons ({args.draws} draws) {mean["random"]:.3f}')
    grid = Image.new('RGB', (rows[0].width, rows[0].height * len(rows)))
    for i, strip in enumerate(rows):
        grid.paste(strip, (0, i * strip.height))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, 'steering.png')
    grid.resize((grid.width * 3, grid.height * 3), Image.NEAREST).save(path)
    print(f'wrote {path} (columns: image, heatmap before, top-{args.k} suppressed, random suppressed, '
          f'before minus top-{args.k} suppressed)')


if __name__ == '__main__':
    main()
