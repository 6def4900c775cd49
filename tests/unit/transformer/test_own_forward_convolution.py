"""Convolutions in a module's own forward (timm's Conv2dSame and StdConv2d, BiT's weight-standardised
convolution), convolutions called functionally, and model code changing a rule's kept output in place
(NaFlexViT's position embedding): against zennit's Epsilon, which re-runs each module's own forward in its
backward and so takes the product the forward took."""
import pytest
import torch
import torch.nn.functional as F
import zennit.rules
from zennit.attribution import Gradient
from zennit.composites import LayerMapComposite
from zennit.types import Convolution

from conftest import assert_rel_close
from lxt_ext.composites import ViTEpsilon
from lxt_ext.core import rule_of
from lxt_ext.errors import NotExplainableError
from lxt_ext.transformer import OwnForwardConvolution

EPSILON = 1e-9


class SameConv(torch.nn.Conv2d):
    """timm's Conv2dSame: TF 'SAME' padding worked out from the input, uneven where the kernel is even."""

    def forward(self, x):
        pads = []
        for size, k, s, d in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride),
                                 reversed(self.dilation)):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv(torch.nn.Conv2d):
    """timm's StdConv2d: the weight standardised per output channel before the convolution."""

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                              momentum=0., eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class FunctionalConv(torch.nn.Module):
    """A convolution that is no Conv module: ``F.conv2d`` in model code (the operation rules take it)."""

    def __init__(self, channels):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(channels, channels, 3, 3) / 6)

    def forward(self, x):
        return F.conv2d(x, self.weight, padding='same')


class PositionAddedInPlace(torch.nn.Module):
    """A patch embedding whose position table is added to the Linear's output in place (NaFlexViT)."""

    def __init__(self, in_place):
        super().__init__()
        self.proj = torch.nn.Linear(12, 8)
        self.pos = torch.nn.Parameter(torch.randn(5, 8))
        self.head = torch.nn.Linear(8 * 5, 4)
        self.in_place = in_place

    def forward(self, x):
        y = self.proj(x)
        if self.in_place:
            y += self.pos
        else:
            y = y + self.pos
        return self.head(torch.relu(y).flatten(1))


def _convolutions(first):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        first, torch.nn.ReLU(), SameConv(6, 6, 4, stride=2), torch.nn.ReLU(), FunctionalConv(6), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(6 * 5 * 5, 4)).double().eval()


def _zennit(model, x, seed):
    composite = LayerMapComposite([(Convolution, zennit.rules.Epsilon(EPSILON)),
                                   (torch.nn.Linear, zennit.rules.Epsilon(EPSILON))])
    if isinstance(model[4], FunctionalConv):  # zennit sees no module there: a Conv2d of the same weight
        conv = torch.nn.Conv2d(6, 6, 3, padding='same', bias=False).double()
        conv.weight.data = model[4].weight.data
        model = torch.nn.Sequential(*model[:4], conv, *model[5:])
    with Gradient(model, composite) as attributor:
        _, relevance = attributor(x, seed)
    return relevance


def _ours(model, x, seed):
    with Gradient(model, ViTEpsilon(epsilon=EPSILON)) as attributor:
        _, relevance = attributor(x, seed)
    return relevance


@pytest.mark.parametrize('first', ['std_same', 'same', 'plain'])
def test_own_forward_and_functional_convolutions_match_zennit(first):
    layer = {'std_same': lambda: StdConv(3, 6, 3, padding=1), 'same': lambda: SameConv(3, 6, 4),
             'plain': lambda: torch.nn.Conv2d(3, 6, 3, padding=1)}[first]
    torch.manual_seed(0)
    model = _convolutions(layer())
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    seed = torch.randn(2, 4, dtype=torch.float64)
    expected = _zennit(model, x, seed)
    # 1e-6: the composite's ReLU takes the identity rule f(x) / (x + 1e-10 sign x), zennit's the gradient 1
    assert_rel_close(_ours(model, x, seed), expected, 1e-6)


def test_own_forward_convolution_takes_the_rule():
    torch.manual_seed(0)
    model = _convolutions(StdConv(3, 6, 3, padding=1))
    with ViTEpsilon(epsilon=EPSILON).context(model):
        assert isinstance(rule_of(model[2]), OwnForwardConvolution)


def test_conservation_without_biases():
    torch.manual_seed(0)
    model = _convolutions(StdConv(3, 6, 3, padding=1, bias=False))
    for module in model.modules():
        if getattr(module, 'bias', None) is not None:
            torch.nn.init.zeros_(module.bias)
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    output = model(x)
    seed = torch.zeros_like(output)
    seed[0, 1] = output[0, 1]
    relevance = _ours(model, x, seed)
    assert relevance.sum().item() == pytest.approx(output[0, 1].item(), rel=1e-8)


class _SquaringConv(torch.nn.Conv2d):
    def forward(self, x):
        return super().forward(x.abs())


def test_own_forward_doing_more_than_padding_is_refused():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), _SquaringConv(4, 4, 3)).double()
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64, requires_grad=True)
    with ViTEpsilon(epsilon=EPSILON).context(model):
        with pytest.raises(NotExplainableError, match="_SquaringConv.*'abs'"):
            model(x)


def _stab(z, epsilon):
    return z + epsilon * (z.sign() + (z == 0).to(z))


def test_kept_output_changed_in_place_matches_the_formula():
    """The in-place add on OutputEpsilon's kept output (not broken by autograd's version check, and the rule sees
    the Linear's output, not the sum): LRP-epsilon written out in the Gradient x Input convention, where the
    position table's add splits the relevance by the summands (zennit's plain gradient would not)."""
    torch.manual_seed(0)
    model = PositionAddedInPlace(True).double().eval()
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    seed = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        p = model.proj(x)
        y = p + model.pos
        h = torch.relu(y).flatten(1)
        z = model.head(h)
        g_h = (seed / _stab(z, EPSILON)) @ model.head.weight  # epsilon on the head
        g_y = g_h.view_as(y) * (y > 0)  # ReLU, positively homogeneous: its gradient
        g_p = g_y * p / _stab(p, EPSILON)  # epsilon on proj from its output; the add passes g
        expected = x * (g_p @ model.proj.weight)  # the first layer emits relevance
    # 1e-7: the output's relevance enters as R / (z + 1e-10 sign z)
    assert_rel_close(_ours(model, x, seed), expected, 1e-7)
