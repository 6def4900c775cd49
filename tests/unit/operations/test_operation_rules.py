"""The operation rules (``lxt_ext.operations``): every operation outside the modules with rules gets its rule or a
refusal before relevance is returned.

Oracles: the explicit formulas of each rule (identity rule: ``R_in = R_out`` element by element; uniform rule: half
of the plain gradient to each factor; CP-LRP: a gate gets none), conservation with offsets zeroed, and lxt_ext's
module tables (fused attention, gated MLPs, norm rules, tested against LXT 2.1 and zennit elsewhere): with the
tables off, the operation path gives the tables' relevance.
"""
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import transformers

from conftest import assert_rel_close
from lxt_ext.composites import LanguageTransformer, TransformerComposite, ViTEpsilon, ViTGamma
from lxt_ext.rules import Epsilon
from lxt_ext.transformer import OutputEpsilon
from lxt_ext.errors import NotExplainableError, UncoveredOperationError


def line_of(marker):
    """``file:line`` of the line of this file that ends with ``marker``."""
    with open(__file__) as source:
        (number,) = [n for n, line in enumerate(source, 1) if line.rstrip().endswith(marker)]
    return f'{__file__}:{number}'


class Body(torch.nn.Module):
    """A module no table knows: ``body(h)`` is the test's functional code."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, h):
        return self.body(h)


class Net(torch.nn.Module):
    """Linear -> an unknown module of functional code -> Linear head (no biases: relevance is conserved)."""

    def __init__(self, body, dim=8, out=3, parameter=False):
        super().__init__()
        torch.manual_seed(0)
        self.inner = torch.nn.Linear(dim, dim, bias=False)
        self.unknown = Body(body)
        self.head = torch.nn.Linear(dim, out, bias=False)
        self.scale = torch.nn.Parameter(torch.randn(dim) * 0.1) if parameter else None

    def forward(self, x):
        return self.head(self.unknown(self.inner(x)))


def relevance(model, x, composite, target=0, keep=None):
    """Input relevance of the ``target`` output (seeded with its value: relevance sums to it), the output, and the
    gradient arriving at the tensor ``keep(model)`` returns (None: none)."""
    x = x.detach().clone().requires_grad_()
    with composite.context(model):
        output = model(x)
        picked = output[..., target]
        (grad,) = torch.autograd.grad(picked, x, picked.detach())
    return (x * grad).detach(), output.detach()


def x_of(shape=(4, 8)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize('attention', ['attnlrp', 'cp'])
@pytest.mark.parametrize('body', [
    lambda h: torch.tanh(h / 4.) * 4.,             # a softcap: identity rule
    lambda h: F.gelu(h) + F.silu(h),               # activations, summed
    lambda h: F.elu(h).clamp(max=2.),              # chained element-wise maps
    lambda h: h * torch.sigmoid(h),                # a product of two carrying tensors (uniform / the gate constant)
    lambda h: torch.relu(h).amax(-1, keepdim=True).expand_as(h) + h,  # homogeneous maps
    lambda h: F.layer_norm(h, h.shape[-1:]),       # the norms: statistics constant
    lambda h: F.rms_norm(h, h.shape[-1:], eps=1e-6),
    lambda h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6),  # RMSNorm written out
    lambda h: (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, keepdim=True, unbiased=False) + 1e-5),
    lambda h: F.normalize(h, dim=-1) * 3.,
    lambda h: F.group_norm(h.reshape(4, 8, 1), 2).reshape(4, 8),
    lambda h: h * 0.5 * (1.0 + torch.erf(h / 2 ** 0.5)),   # GELU written out (ESM): x * g(x), g held constant
    lambda h: h * torch.sigmoid(1.702 * h),               # QuickGELU written out
    lambda h: F.conv1d(h[:, None], torch.ones(2, 1, 3, dtype=h.dtype), padding=1).flatten(1)[:, :8],
    # GELU's tanh form written out (GPT-2's gelu_new): x * g(x) through a sum of x and x ** 3
    lambda h: 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0)))),
    # a sigmoid gate broadcast with expand_as (ECA): the template tensor is no operand
    lambda h: h * torch.sigmoid(h.mean(-1, keepdim=True) * 2.).expand_as(h),
    # normalised by its own sum (ConViT's gated attention weights): the sum held constant
    lambda h: (lambda r: r / r.sum(-1, keepdim=True))(torch.relu(h)),
], ids=['softcap', 'activations', 'chain', 'swish', 'homogeneous', 'layer_norm', 'rms_norm', 'rms_written',
        'layer_norm_written', 'normalize', 'group_norm', 'gelu_written', 'quick_gelu_written', 'functional_conv',
        'gelu_tanh_written', 'expand_as_gate', 'sum_normalised'])
def test_unknown_functional_code_conserves(body, attention):
    """Conservation (relevance sums to the explained output) through operations no module rule covers; the
    forward is unchanged."""
    model = Net(body).double()
    x = x_of()
    plain = model(x)
    R, output = relevance(model, x, LanguageTransformer(attention=attention))
    assert torch.equal(output, plain)
    torch.testing.assert_close(R.sum(-1), output[:, 0], rtol=1e-6, atol=1e-9)


def test_attention_written_out_conserves_under_cp():
    """``softmax(s) @ v`` with both from the input: CP-LRP holds the weights constant, so relevance is conserved
    (AttnLRP's softmax rule is not conservative by itself: its bias term takes a share; the tables-off oracle
    below compares it with the fused op)."""
    model = Net(lambda h: (h.reshape(4, 2, 4).softmax(-1) @ h.reshape(4, 4, 2)).reshape(4, 4).repeat(1, 2)).double()
    x = x_of()
    R, output = relevance(model, x, LanguageTransformer(attention='cp'))
    assert torch.equal(output, model(x))
    torch.testing.assert_close(R.sum(-1), output[:, 0], rtol=1e-6, atol=1e-9)


def gradients(fn, *tensors, composite):
    """The gradients of ``fn(*tensors).sum()`` with the operation rules active (a model around ``fn``)."""
    class Wrap(torch.nn.Module):
        def forward(self, *inputs):
            return fn(*inputs)
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    with composite.context(Wrap()) as model:
        output = model(*leaves)
        # seed the output's relevance with the output itself: the gradient arriving is 1
        grads = torch.autograd.grad(output, leaves, output.detach(), allow_unused=True)
    return output, [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


@pytest.mark.parametrize('attention', ['attnlrp', 'cp'])
def test_a_map_with_an_offset_is_a_gate_in_every_product(attention):
    """``a * sigmoid(b)``: sigmoid(0) = 1/2, so the identity rule cannot pass relevance through it; the sigmoid's
    output is held constant, AttnLRP's uniform rule included: g_a = sigmoid(b), g_b = 0 (written out)."""
    a, b = x_of(), x_of().flip(0)
    output, (g_a, g_b) = gradients(lambda u, v: u * torch.sigmoid(v), a, b,
                                   composite=LanguageTransformer(attention=attention))
    torch.testing.assert_close(g_a, torch.sigmoid(b), rtol=1e-6, atol=1e-9)
    assert not g_b.any()


@pytest.mark.parametrize('body,name', [
    (lambda h: F.softplus(h), 'softplus'),
    (lambda h: torch.sigmoid(h) + h, 'sigmoid'),
    (torch.nn.Sigmoid(), 'Sigmoid'),  # a module: the identity rule from the tables, its output watched all the same
], ids=['softplus', 'sigmoid_added', 'sigmoid_module'])
def test_relevance_through_a_map_with_an_offset_is_refused(body, name):
    model = Net(body).double()
    if isinstance(body, torch.nn.Module):
        model.unknown = body
    with pytest.raises(UncoveredOperationError, match=f'{name} in .*value at 0 is not 0'):
        relevance(model, x_of(), LanguageTransformer(attention='cp'))


def test_a_threshold_shifted_by_a_statistic_holds_the_statistic_constant():
    """``relu(h - (mean(h) + std(h) / 2))`` (Gemma 3n's activation sparsity): the std is an offset held constant,
    the mean linear: g_h = m - mean(m) with m the ReLU's mask (written out), not refused."""
    h = x_of()
    output, (g,) = gradients(lambda t: torch.relu(t - (t.mean(-1, keepdim=True) + t.std(-1, keepdim=True) * 0.5)),
                             h, composite=LanguageTransformer(attention='attnlrp'))
    mask = (output > 0).to(h)
    torch.testing.assert_close(g, mask - mask.mean(-1, keepdim=True), rtol=1e-6, atol=1e-9)


def test_identity_rule_gives_each_input_its_output_relevance():
    x = x_of()
    output, (g,) = gradients(torch.tanh, x, composite=LanguageTransformer())
    torch.testing.assert_close(g * x, output.detach(), rtol=1e-6, atol=1e-9)  # R_in = R_out element-wise


@pytest.mark.parametrize('op', [torch.mul, torch.matmul, lambda a, b: torch.einsum('ij,jk->ik', a, b)],
                         ids=['mul', 'matmul', 'einsum'])
def test_uniform_rule_is_half_the_plain_gradient(op):
    a, b = x_of((8, 8)), x_of((8, 8)).flip(0)
    output, (ga, gb) = gradients(op, a, b, composite=LanguageTransformer(attention='attnlrp'))
    torch.testing.assert_close(output.detach(), op(a, b))
    ga_plain, gb_plain = torch.autograd.grad(op(a.requires_grad_(), b.requires_grad_()), (a, b), torch.ones(8, 8))
    torch.testing.assert_close(ga, ga_plain / 2)
    torch.testing.assert_close(gb, gb_plain / 2)


def test_cp_holds_the_gate_constant():
    """Under CP-LRP the softmax's output (and views of it) is a gate: no relevance through it; under AttnLRP it
    gets half."""
    s, v = x_of((4, 8)), x_of((8, 4))

    def attention(scores, values):
        return scores.softmax(-1).to(torch.float64).contiguous() @ values

    _, (g_scores, g_values) = gradients(attention, s, v, composite=LanguageTransformer(attention='cp'))
    assert torch.count_nonzero(g_scores) == 0
    probs = s.softmax(-1)
    torch.testing.assert_close(g_values, probs.T @ torch.ones(4, 4, dtype=torch.float64))
    _, (g_scores, g_values) = gradients(attention, s, v, composite=LanguageTransformer(attention='attnlrp'))
    assert torch.count_nonzero(g_scores) > 0
    torch.testing.assert_close(g_values, probs.T @ torch.ones(4, 4, dtype=torch.float64) / 2)


def test_a_parameter_derived_factor_is_a_constant_not_a_second_factor():
    """``h * (1 + w)`` (Gemma's norm scale) is linear in ``h``: the parameter side is no relevance-carrying
    factor, even while the parameters require grad (the uniform rule would halve the relevance)."""
    model = Net(None, parameter=True).double()
    model.unknown.body = lambda h: h * (1 + model.scale).exp()
    x = x_of()
    R, output = relevance(model, x, LanguageTransformer())
    torch.testing.assert_close(R.sum(-1), output[:, 0], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize('body,operation', [
    (lambda h: h / h.flip(-1), 'div'),  # a carrying divisor, not its own sum # marker: division
    (lambda h: h.pow(3), 'pow'),  # marker: power
    (lambda h: torch.log(h.abs() + 1), 'abs'),  # marker: log
    (lambda h: h.pow(2) + h, 'add'),  # marker: square
    (lambda h: torch.exp(h.var(-1, keepdim=True)) + h, 'exp'),  # marker: statistic (a map of it added)
], ids=['division', 'power', 'log', 'square', 'statistic'])
def test_uncovered_operations_are_refused_by_operation_module_and_line(body, operation):
    marker = {'div': 'division', 'pow': 'power', 'abs': 'log'}.get(operation)
    model = Net(body).double()
    with pytest.raises(UncoveredOperationError) as raised:
        relevance(model, x_of(), LanguageTransformer())
    message = str(raised.value)
    assert f'{operation} in unknown (Body) at {__file__}:' in message
    if marker is not None:
        assert line_of(f'# marker: {marker}') in message
    assert isinstance(raised.value, NotExplainableError) and isinstance(raised.value, NotImplementedError)


def test_refused_before_any_relevance_and_the_model_is_left_as_it_was():
    model = Net(lambda h: h / h.flip(-1)).double()
    x = x_of()
    plain = model(x)
    composite = LanguageTransformer()
    composite.register(model)
    with pytest.raises(UncoveredOperationError):
        model(x.requires_grad_())
    composite.remove()
    assert torch.equal(model(x), plain)
    with torch.no_grad(), composite.context(model):
        assert torch.equal(model(x), plain)  # no gradient, no relevance: nothing to refuse


def test_strict_false_warns_and_gives_the_plain_gradient():
    model = Net(lambda h: h / h.flip(-1)).double()
    with pytest.warns(UserWarning, match=r'div in unknown \(Body\)'):
        R, output = relevance(model, x_of(), LanguageTransformer(strict=False))
    assert torch.isfinite(R).all()


def test_in_place_activation():
    def body(h):
        h = h * 1.
        h.tanh_()
        return h
    model = Net(body).double()
    R, output = relevance(model, x_of(), LanguageTransformer())
    torch.testing.assert_close(R.sum(-1), output[:, 0], rtol=1e-6, atol=1e-9)


# -- with the module tables off, the operation path reproduces the tables' relevance -----------------------------

_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, head_dim=8)


def _causal_lm(config, model, **overrides):
    def build():
        torch.manual_seed(0)
        lm = model(config(**dict(_TEXT, **overrides))).eval().double()
        embeds = lm.get_input_embeddings()(torch.randint(0, 64, (2, 6))).detach()
        return lm, embeds, lambda m, x: m(inputs_embeds=x).logits
    return build


def _bert():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, num_labels=3)).eval().double()
    return model, model.get_input_embeddings()(torch.randint(0, 64, (2, 6))).detach(), \
        lambda m, x: m(inputs_embeds=x).logits


def _gpt2():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, activation_function='gelu')).eval().double()
    return model, model.get_input_embeddings()(torch.randint(0, 64, (2, 6))).detach(), \
        lambda m, x: m(inputs_embeds=x).logits


def _timm_vit():
    torch.manual_seed(0)
    model = timm.create_model('vit_base_patch16_224', pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=4, num_classes=10).eval().double()
    return model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64), \
        lambda m, x: m(x)


TABLES_OFF = {
    'llama': (_causal_lm(transformers.LlamaConfig, transformers.LlamaForCausalLM), LanguageTransformer),
    'qwen2': (_causal_lm(transformers.Qwen2Config, transformers.Qwen2ForCausalLM), LanguageTransformer),
    'gemma': (_causal_lm(transformers.GemmaConfig, transformers.GemmaForCausalLM), LanguageTransformer),
    'bert': (_bert, LanguageTransformer),
    'gpt2': (_gpt2, LanguageTransformer),
    'timm-vit-epsilon': (_timm_vit, ViTEpsilon),
    'timm-vit-gamma': (_timm_vit, ViTGamma),
}


@pytest.mark.parametrize('attention', ['attnlrp', 'cp'])
@pytest.mark.parametrize('family', TABLES_OFF)
def test_operation_path_reproduces_the_module_tables(family, attention):
    build, composite = TABLES_OFF[family]
    model, x, forward = build()

    def explained(tables):
        leaf = x.clone().requires_grad_()
        with composite(attention=attention, tables=tables).context(model):
            out = forward(model, leaf)
            picked = out.reshape(-1, out.shape[-1])[:, 1]
            (grad,) = torch.autograd.grad(picked, leaf, picked.detach())
        return (leaf * grad).detach(), out.detach()

    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no uncovered operation passed with a warning
        R_tables, out_tables = explained(True)
        R_operations, out_operations = explained(False)
    torch.testing.assert_close(out_operations, out_tables, rtol=1e-12, atol=1e-12)
    assert R_tables.abs().max() > 0
    torch.testing.assert_close(R_operations, R_tables, rtol=1e-7, atol=1e-10 * R_tables.abs().max().item())


def test_an_activation_module_output_is_a_gate_too():
    """Under CP-LRP a gated product of an activation *module* (its own rule, the identity rule) and another
    carrying tensor holds the activation's output constant, as for ``F.silu`` called functionally."""
    class Gated(torch.nn.Module):
        def __init__(self, act):
            super().__init__()
            self.act = act

        def forward(self, a, b):
            return self.act(a) * b

    a, b = x_of((4, 8)), x_of((4, 8)).flip(0)
    for act in (torch.nn.SiLU(), F.silu):
        model = Gated(act) if isinstance(act, torch.nn.Module) else Gated(torch.nn.Identity())
        if not isinstance(act, torch.nn.Module):
            model.forward = lambda x, y: F.silu(x) * y
        la, lb = a.clone().requires_grad_(), b.clone().requires_grad_()
        with LanguageTransformer(attention='cp').context(model):
            out = model(la, lb)
            grads = torch.autograd.grad(out, (la, lb), out.detach(), allow_unused=True)
        assert grads[0] is None or torch.count_nonzero(grads[0]) == 0
        torch.testing.assert_close(grads[1], F.silu(a))


def _no_grad_then(use):
    def body(h):
        with torch.no_grad():
            side = torch.tanh(h) * 2.  # computed from the input without grad: cut off the relevance path
        return use(h, side.to(h.dtype))
    return body


@pytest.mark.parametrize('body', [
    _no_grad_then(lambda h, side: h + side),
    lambda h: h + h.detach() * 0.5,
    _no_grad_then(lambda h, side: torch.cat([h[:, :4], side[:, 4:]], -1)),
], ids=['no_grad-added', 'detach-added', 'no_grad-concatenated'])
def test_input_cut_off_the_relevance_path_and_added_is_refused(body):
    """Model code computing from the input without grad and adding the result to the relevance path (as HRM's
    truncated recurrence does): the relevance through it is lost, so the forward refuses it."""
    with pytest.raises(UncoveredOperationError, match='without grad'):
        relevance(Net(body).double(), x_of(), LanguageTransformer())


def test_input_cut_off_the_relevance_path_as_a_factor_is_a_constant():
    """Computed without grad and used as a factor: a constant scaling, relevance conserved (how routers and gates
    are held constant)."""
    model = Net(_no_grad_then(lambda h, side: h * torch.sigmoid(side))).double()
    R, output = relevance(model, x_of(), LanguageTransformer())
    torch.testing.assert_close(R.sum(-1), output[:, 0], rtol=1e-6, atol=1e-9)


class TwoStems(torch.nn.Module):
    """Two first layers: the image into one patch convolution and, downsampled (or as it is), into another (as
    CrossViT's two branches)."""

    def __init__(self, downsample):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = torch.nn.Conv2d(3, 4, 4, stride=4), torch.nn.Conv2d(3, 4, 2, stride=2)
        self.head = torch.nn.Linear(8, 3)
        self.downsample = downsample

    def forward(self, x):
        y = F.interpolate(x, scale_factor=0.5) if self.downsample else x[..., ::2, ::2]
        return self.head(torch.cat([self.first(x).mean((2, 3)), self.second(y).mean((2, 3))], -1))


@pytest.mark.parametrize('downsample,operation', [(True, 'interpolate'), (False, 'Conv2d')])
def test_an_input_used_besides_the_first_layer_is_refused_with_an_explicit_first_layer(downsample, operation):
    """With a first layer that emits relevance (the ViT composites), the input's gradient must be relevance: a second
    path from the input (through an interpolation, or a selection into another convolution) would mix gradient into
    it, so the forward refuses it; without an explicit first layer the same model conserves."""
    model, x = TwoStems(downsample).double().eval(), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(UncoveredOperationError, match=f'{operation} in .*besides the first layer'):
        relevance(model, x, ViTEpsilon(attention='cp', epsilon=1e-12))
    with torch.no_grad():
        for module in (model.first, model.second, model.head):
            module.bias.zero_()
    R, output = relevance(model, x, LanguageTransformer(attention='cp', epsilon=1e-12))
    torch.testing.assert_close(R.flatten(1).sum(1), output[:, 0], rtol=1e-6, atol=1e-9)


def test_the_conservation_check_keeps_the_gates():
    """The conservation check taps every module's output; under CP-LRP a softmax behind a dropout module (a rule of
    its own) is still the gate held constant, so an attention written out conserves module by module."""
    from lxt_ext.diagnostics import conservation

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q, self.k, self.v = (torch.nn.Linear(8, 8, bias=False) for _ in range(3))
            self.drop, self.head = torch.nn.Dropout(0.1), torch.nn.Linear(8, 3, bias=False)

        def forward(self, x):
            weights = self.drop((self.q(x) @ self.k(x).transpose(-1, -2)).softmax(-1))
            return self.head((weights @ self.v(x)).mean(1))

    report = conservation(Attention().double().eval(), torch.randn(2, 5, 8, dtype=torch.float64),
                          LanguageTransformer(attention='cp'))
    report.check()
    reached = {module.name: module.r_out for module in report.modules}
    assert reached.get('q', 0) == 0 and reached.get('k', 0) == 0 and reached['v'] != 0  # the weights: constant


def test_a_functional_convolution_takes_the_convolution_rule():
    """``F.conv1d`` called outside a module takes the composite's convolution rule (``FusedRule.convolution``):
    LRP-epsilon written out in the Gradient x Input convention, ``g_in = W^T (g_out * y / stab(y))`` for the head,
    the convolution and the first Linear."""
    weight = torch.randn(1, 1, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    model = Net(lambda h: F.conv1d(h[:, None], weight, padding=1)[:, 0]).double()
    x = x_of()
    actual, output = relevance(model, x, TransformerComposite(Epsilon(1e-9), conv_rule=Epsilon(1e-9)))

    def stab(t, epsilon=1e-9):
        return t + epsilon * (t.sign() + (t == 0).to(t))
    with torch.no_grad():
        h = model.inner(x)
        z = F.conv1d(h[:, None], weight, padding=1)[:, 0]
        picked = output[..., 0]
        g_out = picked / stab(picked, 1e-10)  # the seed is the output's relevance
        g_z = (g_out * picked / stab(picked))[:, None] * model.head.weight[0]
    leaf = h.clone().requires_grad_()
    (g_h,) = torch.autograd.grad(F.conv1d(leaf[:, None], weight, padding=1)[:, 0], leaf, g_z * z / stab(z))
    expected = x * ((g_h * h / stab(h)) @ model.inner.weight)
    assert_rel_close(actual, expected, 1e-9)


