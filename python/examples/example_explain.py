"""The Python API behind ``lxt-ext explain``, on the embedded model and its shipped samples (offline).

    python python/examples/example_explain.py [--out example_explained]

1. ``lxt_ext.explain``: batches of tensors in, one ``Explanation`` (logits, relevance, explained class,
   its logit) per batch out, the composite registered once.
2. ``lxt_ext.ExplainJob``: the data-set runner the command line uses (files in, heatmaps, relevance and a
   JSONL index out; resumable).
"""
import argparse

import torch

import lxt_ext
from lxt_ext.composites import ViTEpsilon
from lxt_ext.data import embedded


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='example_explained')
    args = parser.parse_args()

    model = embedded.load_model()
    images, masks, labels, names = embedded.load_samples()

    def normalise(batch):
        return (batch - embedded.MEAN.view(1, 3, 1, 1)) / embedded.STD.view(1, 3, 1, 1)

    composite = ViTEpsilon(attention='attnlrp')
    inside = []
    for start, e in zip(range(0, len(images), 4), lxt_ext.explain(model, images, composite, batch_size=4,
                                                                    preprocess=normalise)):
        relevance = e.relevance.sum(1)                     # (N, H, W): pixel relevance
        positive = relevance.clamp(min=0)
        mask = masks[start:start + len(relevance)]
        inside += (positive * mask).flatten(1).sum(1).div(positive.flatten(1).sum(1)).tolist()
        for name, cls, logit, total in zip(names[start:], e.target, e.score, relevance.flatten(1).sum(1)):
            print(f'{name}: class {embedded.CLASSES[int(cls)]}, logit {float(logit):.3f}, '
                  f'relevance sum {float(total):.3f}')
    print(f'positive relevance on the object: {100 * sum(inside) / len(inside):.1f} % on average')

    job = lxt_ext.ExplainJob(model, composite, lxt_ext.job.JobSettings(
        [embedded.SAMPLES_DIR], args.out, size=embedded.IMAGE_SIZE, mean=embedded.MEAN, std=embedded.STD,
        identity={'model': 'embedded', 'composite': 'vit_epsilon'}, relevance='npy'))
    print(lxt_ext.job.summary_text(job.run()))


if __name__ == '__main__':
    torch.set_num_threads(2)
    main()
