"""Median time of plain forward+backward, zennit EpsilonGammaBox and lxt_ext EpsilonGammaBox in one run.

    python python/benchmark_time.py vgg16|resnet50   (random weights, batch 4, 224x224, 2 threads)
"""
import torch, torchvision, time, statistics, sys
from zennit.attribution import Gradient
from zennit.torchvision import VGGCanonizer, ResNetCanonizer
import zennit.composites as zc
import lxt_ext.composites as lc
torch.set_num_threads(2)
torch.manual_seed(0)
name = sys.argv[1] if len(sys.argv) > 1 else 'vgg16'
model = getattr(torchvision.models, name)().eval()
can = VGGCanonizer if 'vgg' in name else ResNetCanonizer
x = torch.randn(4, 3, 224, 224)
t = torch.eye(1000)[[1,2,3,4]]
def plain():
    xx = x.clone().requires_grad_(); y = model(xx); torch.autograd.grad(y, xx, t)
def attr(mod):
    comp = mod.EpsilonGammaBox(low=-3., high=3., canonizers=[can()])
    def f():
        with Gradient(model, comp) as a: a(x, t)
    return f
fs = {'plain': plain, 'zennit': attr(zc), 'lxt_ext': attr(lc)}
times = {k: [] for k in fs}
for f in fs.values(): f()
for _ in range(3):
    for k, f in fs.items():
        s = time.perf_counter(); f(); times[k].append(time.perf_counter() - s)
med = {k: statistics.median(v) for k, v in times.items()}
print(name, {k: round(v, 2) for k, v in med.items()}, 'zennit/plain %.2f lxt/plain %.2f speedup %.2f' % (med['zennit']/med['plain'], med['lxt_ext']/med['plain'], med['zennit']/med['lxt_ext']))
