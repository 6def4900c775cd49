"""lxt_ext's perturbation curves against Quantus 0.6's RegionPerturbation: the same values, and each one's time
against the batched forwards the curves need (2 threads).

    python python/benchmarks/benchmark_quantus.py [--workloads embedded vit_b_16 generated] [--images 8]
        [--generated 2000] [--repeats 3]

Workloads (region perturbation, most relevant first, a 0.0 fill, every step until every patch is gone):

- ``embedded``: the embedded model on its 12 sample images (64 x 64, 8 x 8 patches: 64 steps), the true class,
  relevance from ``ViTGamma`` (the embedded model's default composite);
- ``generated``: the embedded model on ``--generated`` freshly generated held-out images (``lxt-ext evaluate
  --generate``'s images: seeds from 1,000,000), otherwise as ``embedded`` (the thousands-of-images scale);
- ``vit_b_16``: torchvision's vit_b_16 with random weights on ``--images`` random 224 x 224 images (16 x 16
  patches: 196 steps), the top class, Gaussian relevance (continuous: no ties in the ranking, whose order Quantus's
  unstable argsort would break differently).

Methods: ``forwards`` (the floor: the ``steps + 1`` forwards of the batch that the curves need, nothing else),
``lxt_ext`` (``lxt_ext.evaluation.perturbation_curve``, batched: one forward of all images per step) and
``quantus`` (``quantus.RegionPerturbation(...)(model=..., x_batch=..., ...)``, per sample, NumPy between steps). The
model sees pixels in 0..1 (the normalisation is its first module), as Quantus passes its batch unchanged.
Time: interleaved medians in one process (one forward of the batch as warm-up, then ``--repeats`` rounds, each
method once per round). Values: Quantus's
``y(x) - y(x_k)`` for k >= 1 against lxt_ext's curve, max |difference| / max |Quantus|.
"""
import argparse
import os
import sys

import numpy as np
import torch

from harness.models import vit
from harness.timing import interleaved_medians


class Normalised(torch.nn.Module):
    """``model((x - mean) / std)``: a model of pixels in 0..1."""

    def __init__(self, model, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer('mean', torch.as_tensor(mean).view(1, -1, 1, 1))
        self.register_buffer('std', torch.as_tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.model((x - self.mean) / self.std)


def workload(name, images, generated=2000):
    """``(model, x, relevance, target, patch)``."""
    if name in ('embedded', 'generated'):
        from lxt_ext.attribution import explain_batch
        from lxt_ext.composites import ViTGamma
        from lxt_ext.data import embedded
        from lxt_ext.job.evaluation import DEFAULT_SEED, generated as generated_images
        model = Normalised(embedded.load_model(), embedded.MEAN, embedded.STD).eval()
        if name == 'embedded':
            x, _, target, _ = embedded.load_samples()
        else:
            x, _, target = next(generated_images(DEFAULT_SEED, [range(generated)]))
        relevance = torch.cat([explain_batch(model.model, (chunk - embedded.MEAN) / embedded.STD, ViTGamma(),
                                             labels).relevance.detach()
                               for chunk, labels in zip(x.split(256), target.split(256))])
        return model, x, relevance, target, 8
    generator = torch.Generator().manual_seed(0)
    model = Normalised(vit(), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()
    x = torch.rand(images, 3, 224, 224, generator=generator)
    relevance = torch.randn(x.shape, generator=generator)
    with torch.no_grad():
        target = model(x).argmax(1)
    return model, x, relevance, target, 16


def measure(name, images, repeats, generated=2000):
    import quantus
    from lxt_ext.evaluation import perturbation_curve
    model, x, relevance, target, patch = workload(name, images, generated)
    steps = (x.shape[2] // patch) * (x.shape[3] // patch)
    metric = quantus.RegionPerturbation(patch_size=patch, order='morf', regions_evaluation=steps, abs=False,
                                        normalise=False, perturb_baseline=0.0, disable_warnings=True,
                                        display_progressbar=False)
    arrays = dict(x_batch=x.numpy(), y_batch=target.numpy(), a_batch=relevance.numpy())
    results = {}

    def forwards():
        with torch.no_grad():
            for _ in range(steps + 1):
                model(x)

    def ours():
        results['lxt_ext'] = perturbation_curve(model, x, relevance, target, order='morf', unit='patch',
                                                patch_size=patch, max_steps=steps, progress=False)

    def theirs():
        results['quantus'] = np.asarray(metric(model=model, **arrays, softmax=False, channel_first=True,
                                               device='cpu', batch_size=x.shape[0]))

    with torch.no_grad():
        model(x)  # the kernels' warm-up; a run of the whole curve is long enough to need no other
    seconds = interleaved_medians({'forwards': forwards, 'lxt_ext': ours, 'quantus': theirs}, repeats, warm_up=False)
    curve = results['lxt_ext']
    ours_values = (curve[:, :1] - curve[:, 1:]).numpy()
    difference = np.abs(ours_values - results['quantus']).max() / np.abs(results['quantus']).max()
    return steps, x.shape[0], seconds, difference


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workloads', nargs='+', default=['embedded', 'vit_b_16'],
                        choices=['embedded', 'vit_b_16', 'generated'])
    parser.add_argument('--images', type=int, default=8, help='vit_b_16 images (default 8)')
    parser.add_argument('--generated', type=int, default=2000, help='generated images (default 2000)')
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f'load average before: {os.getloadavg()[0]:.1f}', file=sys.stderr)
    rows = []
    for name in args.workloads:
        steps, n, seconds, difference = measure(name, args.images, args.repeats, args.generated)
        print(f'  {name}: {seconds} (load {os.getloadavg()[0]:.1f})', file=sys.stderr)
        rows.append((name, steps, n, seconds, difference))
    print('| workload | images | steps | forwards (s) | lxt_ext (s) | Quantus (s) | lxt_ext / forwards | '
          'Quantus / forwards | Quantus / lxt_ext | max difference / max value |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    for name, steps, n, s, difference in rows:
        print(f'| {name} | {n} | {steps} | {s["forwards"]:.2f} | {s["lxt_ext"]:.2f} | {s["quantus"]:.2f} | '
              f'{s["lxt_ext"] / s["forwards"]:.2f} | {s["quantus"] / s["forwards"]:.2f} | '
              f'{s["quantus"] / s["lxt_ext"]:.2f} | {difference:.1e} |')


if __name__ == '__main__':
    main()
