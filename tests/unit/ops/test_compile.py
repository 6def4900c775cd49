"""``torch.compile`` of a ViT under a registered lxt_ext composite (register, then compile, then
attribute) gives the eager relevance, with the lxt_ext ops inside the captured graphs: a counting backend
(AOTAutograd, the ``aot_eager`` pipeline) records the graphs dynamo hands it and the forward and backward
graphs AOTAutograd makes of them. Graph breaks around every rule would run the rules eagerly and still
give the right relevance, so the test also asserts what was captured: one graph, no break.
"""
import pytest
import torch
import torchvision
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from lxt_ext.composites import ViTEpsilon, ViTGamma


class CountingBackend:
    """An ``aot_eager`` backend that keeps every graph: ``dynamo`` (what dynamo captured), ``forward`` and
    ``backward`` (what AOTAutograd made of each), all run as they are."""

    def __init__(self):
        self.graphs = {'dynamo': [], 'forward': [], 'backward': []}
        self._aot = aot_autograd(fw_compiler=self._keep('forward'), bw_compiler=self._keep('backward'))

    def _keep(self, kind):
        def compiler(gm, example_inputs):
            self.graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    def __call__(self, gm, example_inputs):
        self.graphs['dynamo'].append(gm)
        return self._aot(gm, example_inputs)

    def lxt_ext_ops(self, kind):
        """Names of the lxt_ext ops called in the ``kind`` graphs."""
        return {node.target.name() for gm in self.graphs[kind] for node in gm.graph.nodes
                if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == 'lxt_ext'}


def small_vit(dtype):
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10)
    torch.nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zero-initialises the head
    return model.to(dtype).eval()


def relevance(model, x, classes):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    (grad,) = torch.autograd.grad(out, x, torch.nn.functional.one_hot(classes, out.shape[-1]).to(out.dtype))
    return grad


# ViTEpsilon: AttnLRP, OutputEpsilon on Linear (no op), fused epsilon on the patch embedding (lrp_backward);
# ViTGamma: CP-LRP, fused gamma on every Linear and the patch embedding.
CASES = [(ViTEpsilon, torch.float64, 1e-12), (ViTGamma, torch.float64, 1e-12), (ViTGamma, torch.float32, 1e-5)]


@pytest.mark.parametrize('composite,dtype,rtol', CASES, ids=[f'{c.__name__}-{str(d)[6:]}' for c, d, _ in CASES])
def test_compiled_vit_gives_the_eager_relevance(composite, dtype, rtol):
    torch._dynamo.reset()
    model = small_vit(dtype)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)
    classes = torch.tensor([3, 7])
    handle = composite()
    handle.register(model)
    try:
        eager = relevance(model, x, classes)
        backend = CountingBackend()
        compiled = relevance(torch.compile(model, backend=backend), x, classes)
    finally:
        handle.remove()
    assert eager.abs().max() > 0, 'zero relevance: the comparison would be vacuous'
    err, scale = (compiled - eager).abs().max().item(), eager.abs().max().item()
    assert err <= rtol * scale, f'compiled relevance differs by {err:.3e} (max |eager| {scale:.3e})'
    assert len(backend.graphs['dynamo']) == 1, f"{len(backend.graphs['dynamo'])} graphs: dynamo broke the graph"
    # float32: ATen's fused attention forward (lxt_ext.ops.fused_attention); CP-LRP's backward stays lxt_ext's
    assert backend.lxt_ext_ops('forward') == (set() if dtype == torch.float32 else {'lxt_ext::attention_forward'})
    assert backend.lxt_ext_ops('backward') == {'lxt_ext::attention_backward', 'lxt_ext::lrp_backward',
                                               'lxt_ext::identity_backward'}  # GELU's identity rule
