"""A zennit user's attribution before and after switching one import (random-weight VGG-16).

    python python/examples/example_zennit_swap.py
"""
import time

import torch
import torchvision
from zennit.attribution import Gradient
from zennit.composites import EpsilonGammaBox as ZennitEpsilonGammaBox
from zennit.torchvision import VGGCanonizer

from lxt_ext.composites import EpsilonGammaBox

torch.manual_seed(0)
model = torchvision.models.vgg16().eval()
x = torch.randn(2, 3, 224, 224)
target = torch.eye(1000)[[1, 2]]

results = {}
for name, composite_cls in [('zennit', ZennitEpsilonGammaBox), ('lxt_ext', EpsilonGammaBox)]:
    composite = composite_cls(low=-3., high=3., canonizers=[VGGCanonizer()])
    start = time.perf_counter()
    with Gradient(model, composite) as attributor:
        output, relevance = attributor(x, target)
    results[name] = relevance
    print(f'{name:8s} {time.perf_counter() - start:6.2f} s, relevance sum per image {relevance.sum((1, 2, 3)).tolist()}')

difference = (results['zennit'] - results['lxt_ext']).abs().max() / results['zennit'].abs().max()
print(f'max |zennit - lxt_ext| / max |zennit| = {difference:.2e}')
