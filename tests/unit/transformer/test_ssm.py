"""MambaLRP's rule on a Mamba mixer (``lxt_ext.transformer.ssm``), against MambaLRP written out: the SiLU's sigmoid,
the scan's coefficients ``exp(dt A)``, ``dt B`` and ``C`` held constant, the gate ``y * silu(z)`` under AttnLRP's
uniform rule or CP-LRP's gate held constant (Jafari et al. 2024, arXiv 2406.07592), and conservation."""
import pytest
import torch
import torch.nn.functional as F

from lxt_ext.composites import LanguageTransformer
from lxt_ext.core import rule_of
from lxt_ext.errors import NotExplainableError
from lxt_ext.transformer import SelectiveSSM

transformers = pytest.importorskip('transformers')


def mixer():
    torch.manual_seed(0)
    config = transformers.MambaConfig(hidden_size=16, state_size=4, expand=2, conv_kernel=3, time_step_rank=4,
                                      num_hidden_layers=1, vocab_size=32)
    return transformers.models.mamba.modeling_mamba.MambaMixer(config, layer_idx=0).double().eval()


def mamba_lrp(m, x, attention):
    """The mixer's forward (transformers' torch path, the full-sequence scan) with MambaLRP's detaches."""
    length = x.shape[1]
    h, z = m.in_proj(x).transpose(1, 2).chunk(2, dim=1)
    weight = m.conv1d.weight
    pre = F.conv1d(h, weight, m.conv1d.bias, padding=weight.shape[-1] - 1, groups=h.shape[1])[..., :length]
    u = pre * torch.sigmoid(pre).detach()                                   # SiLU: the sigmoid constant
    dt, B, C = torch.split(m.x_proj(u.transpose(1, 2)).detach(),            # the coefficients: constants
                           [m.time_step_rank, m.ssm_state_size, m.ssm_state_size], dim=-1)
    dt = F.softplus(m.dt_proj.weight @ dt.transpose(1, 2) + m.dt_proj.bias[:, None])
    A = -torch.exp(m.A_log)
    decay, B_dt = torch.exp(A[None, :, None, :] * dt[..., None]), dt[..., None] * B[:, None]
    state, ys = torch.zeros(x.shape[0], u.shape[1], m.ssm_state_size, dtype=x.dtype), []
    for i in range(length):
        state = decay[:, :, i] * state + B_dt[:, :, i] * u[:, :, i, None]
        ys.append((state @ C[:, i, :, None])[..., 0])
    y = torch.stack(ys, -1) + u * m.D[None, :, None]
    gate = z * torch.sigmoid(z).detach()                                    # SiLU of the gate branch
    if attention == 'cp':
        y = y * gate.detach()
    else:
        y = 0.5 * (y * gate.detach()) + 0.5 * (y.detach() * gate)           # the uniform rule on the product
    return m.out_proj(y.transpose(1, 2))


def assert_relevance_is(m, reference_of, attention, forward_tolerance):
    """The mixer's input relevance under ``LanguageTransformer(attention)`` is that of ``reference_of(m, x,
    attention)`` (MambaLRP written out, float64), whose forward matches the mixer's within ``forward_tolerance``
    ((rtol, atol): transformers computes parts of the scan in float32)."""
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = m(x)
    xr = x.clone().requires_grad_()
    reference = reference_of(m, xr, attention)
    torch.testing.assert_close(reference, plain, rtol=forward_tolerance[0], atol=forward_tolerance[1])
    (g_ref,) = torch.autograd.grad(reference, xr, torch.ones_like(reference))
    xl = x.clone().requires_grad_()
    with LanguageTransformer(attention=attention).context(m):
        assert isinstance(rule_of(m), SelectiveSSM)
        out = m(xl)
        (g,) = torch.autograd.grad(out, xl, out.detach())                  # the seed is relevance: g = 1 at the output
    assert torch.equal(out.detach(), plain.detach())
    expected = xr.detach() * g_ref
    torch.testing.assert_close(xl * g, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize('attention', ['attnlrp', 'cp'])
def test_mixer_relevance_is_mamba_lrp(attention):
    # the forward written out is the mixer's (which computes the scan's coefficients in float32)
    assert_relevance_is(mixer(), mamba_lrp, attention, (1e-6, 1e-9))


def test_mamba_conserves_and_the_rule_is_registered_and_removed():
    torch.manual_seed(0)
    model = transformers.MambaForCausalLM(transformers.MambaConfig(
        hidden_size=16, state_size=4, expand=2, conv_kernel=3, time_step_rank=4, num_hidden_layers=2,
        vocab_size=32)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('bias'):
                p.zero_()
    x = model.get_input_embeddings()(torch.randint(32, (1, 6))).detach().requires_grad_()
    composite = LanguageTransformer(attention='cp')
    with composite.context(model):
        assert sum(isinstance(h, SelectiveSSM) for h in composite.hook_refs) == 2
        logit = model(inputs_embeds=x).logits[0, -1, 3]
        (g,) = torch.autograd.grad(logit, x, logit.detach())
    torch.testing.assert_close((x * g).sum().double(), logit.detach().double(), rtol=1e-5, atol=0)
    assert not any(layer.mixer.x_proj._forward_hooks for layer in model.backbone.layers)


def mamba2_mixer():
    torch.manual_seed(0)
    config = transformers.Mamba2Config(hidden_size=16, state_size=4, expand=2, n_groups=2, head_dim=8, num_heads=4,
                                       conv_kernel=3, chunk_size=4, num_hidden_layers=1, vocab_size=32)
    return transformers.models.mamba2.modeling_mamba2.Mamba2Mixer(config, layer_idx=0).double().eval()


def mamba2_lrp(m, x, attention):
    """A Mamba-2 mixer's forward as a plain recurrence (not transformers' chunked scan) with MambaLRP's detaches:
    dt, B and C constants, the SiLUs' sigmoids constant, the gated norm's gate under AttnLRP's uniform rule or held
    constant (CP-LRP), its variance constant."""
    batch, length = x.shape[:2]
    heads, width, groups, states = m.num_heads, m.head_dim, m.n_groups, m.ssm_state_size
    z, xbc, dt = m.in_proj(x).split([m.intermediate_size, m.conv_dim, heads], dim=-1)
    weight = m.conv1d.weight
    pre = F.conv1d(xbc.transpose(1, 2), weight, m.conv1d.bias, padding=weight.shape[-1] - 1,
                   groups=m.conv_dim)[..., :length].transpose(1, 2)
    u = pre * torch.sigmoid(pre).detach()                                   # SiLU: the sigmoid constant
    u, B, C = u.split([m.intermediate_size, groups * states, groups * states], dim=-1)
    B, C, dt = B.detach(), C.detach(), dt.detach()                          # the coefficients: constants
    dt = F.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    u = u.reshape(batch, length, heads, width)
    group = torch.arange(heads) // (heads // groups)                        # the group of each head
    B = B.reshape(batch, length, groups, states)[:, :, group]
    C = C.reshape(batch, length, groups, states)[:, :, group]
    state, ys = torch.zeros(batch, heads, width, states, dtype=x.dtype), []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        state = decay * state + (dt[:, t, :, None, None] * u[:, t, :, :, None]) * B[:, t, :, None, :]
        ys.append((state * C[:, t, :, None, :]).sum(-1) + m.D[:, None] * u[:, t])
    y = torch.stack(ys, 1).reshape(batch, length, -1)
    gate = z * torch.sigmoid(z).detach()                                    # SiLU of the gate branch
    h = y * gate.detach() if attention == 'cp' else 0.5 * (y * gate.detach()) + 0.5 * (y.detach() * gate)
    grouped = h.reshape(batch, length, groups, -1)
    variance = grouped.pow(2).mean(-1, keepdim=True).detach()              # the norm's statistic constant
    h = (grouped * torch.rsqrt(variance + m.norm.variance_epsilon)).reshape(batch, length, -1) * m.norm.weight
    return m.out_proj(h)


@pytest.mark.parametrize('attention', ['attnlrp', 'cp'])
def test_mamba2_mixer_relevance_is_mamba_lrp(attention):
    # transformers' chunked scan and gated norm run in float32, the recurrence written out in float64
    assert_relevance_is(mamba2_mixer(), mamba2_lrp, attention, (1e-5, 1e-6))


class _Unsplit(transformers.models.mamba2.modeling_mamba2.Mamba2Mixer):
    """A mixer with Mamba-2's attributes whose forward does not split as Mamba-2 does."""

    def forward(self, hidden_states, **kwargs):
        return self.out_proj(torch.tanh(self.in_proj(hidden_states)[..., :self.intermediate_size]))


def test_a_mixer_that_does_not_split_as_mamba2_is_refused_before_relevance():
    m = mamba2_mixer()
    m.__class__ = _Unsplit
    x = torch.randn(1, 5, 16, dtype=torch.float64, requires_grad=True)
    with LanguageTransformer(attention='cp', layer_map=[(_Unsplit, SelectiveSSM())]).context(m):
        with pytest.raises(NotExplainableError, match='did not split'):
            m(x)
