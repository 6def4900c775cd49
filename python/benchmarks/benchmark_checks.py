"""Time of lxt_ext's per-layer NaN/Inf checks (lxt_ext.checks) on the CPU: attributions with the checks
on and off (``lxt_ext.checks.cpu_checks``), interleaved in one process, median of ``--repeats``.

    .venv/bin/python python/benchmarks/benchmark_checks.py resnet50 vit_b_16 decoder

Each attribution is zennit-style use (zennit's ``Gradient``, or ``composite.context`` and autograd), where the
checks run in passing; lxt_ext's own attributors defer them (``lxt_ext.checks.located``: no cost while values
are finite). ``decoder``: benchmark_language.py's workload (LLaMA-style, 2,048 tokens, ``LanguageTransformer``,
the top logit at the last token, parameters frozen as the attributors freeze them).
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torchvision
from zennit.attribution import Gradient
from zennit.torchvision import ResNetCanonizer

import lxt_ext.checks as checks
import lxt_ext.composites as composites


def attribution(name, batch):
    """A callable running one attribution of ``name`` (random weights)."""
    if name == 'decoder':
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from benchmark_language import workload
        from lxt_ext.attribution import frozen_parameters
        model, embeds = workload(2048)
        language = composites.LanguageTransformer(attention='attnlrp')

        def run_decoder():
            x = embeds.clone().requires_grad_()
            with language.context(model) as modified, frozen_parameters(model):
                out = modified(inputs_embeds=x, logits_to_keep=1).logits[:, -1]
                seed = torch.zeros_like(out).scatter_(-1, out.argmax(-1, keepdim=True), 1.0)
                (grad,) = torch.autograd.grad(out, x, seed)
            return x * grad
        return run_decoder
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    if name.startswith('vit'):
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
        composite = composites.ViTEpsilon
    else:
        def composite():
            return composites.EpsilonGammaBox(low=-3., high=3., canonizers=[ResNetCanonizer()])
    x = torch.randn(batch, 3, 224, 224)
    seed = torch.eye(1000)[torch.arange(batch)]

    def run():
        with Gradient(model, composite()) as attributor:
            return attributor(x, seed)
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('models', nargs='+', choices=['resnet50', 'vit_b_16', 'decoder'])
    parser.add_argument('--repeats', type=int, default=4)
    parser.add_argument('--batch', type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print('| model | checks on (s) | checks off (s) | on / off |\n|---|---|---|---|')
    for name in args.models:
        attribute = attribution(name, args.batch)

        def run():
            start = time.perf_counter()
            attribute()
            return time.perf_counter() - start

        run()  # warm-up
        times = {'on': [], 'off': []}
        try:
            for _ in range(args.repeats):
                for mode in times:
                    checks.cpu_checks(mode == 'on')
                    times[mode].append(run())
        finally:
            checks.cpu_checks(True)
        on, off = statistics.median(times['on']), statistics.median(times['off'])
        print(f'| {name} | {on:.2f} | {off:.2f} | {on / off:.2f} |')


if __name__ == '__main__':
    main()
