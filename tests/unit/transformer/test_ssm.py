"""MambaLRP's rule on a Mamba mixer (``lxt_ext.transformer.ssm``), against MambaLRP written out: the SiLU's sigmoid,
the scan's coefficients ``exp(dt A)``, ``dt B`` and ``C`` held constant, the gate ``y * silu(z)`` under AttnLRP's
uniform rule or CP-LRP's gate held constant (Jafari et al. 2024, arXiv 2406.07592), and conservation."""
import pytest
import torch
import torch.nn.functional as F

from lxt_ext.composites import LanguageTransformer
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


@pytest.mark.parametrize('attention', ['attnlrp', 'cp'])
def test_mixer_relevance_is_mamba_lrp(attention):
    m = mixer()
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    plain = m(x)
    xr = x.clone().requires_grad_()
    reference = mamba_lrp(m, xr, attention)
    # the forward written out is the mixer's (which computes the scan's coefficients in float32)
    torch.testing.assert_close(reference, plain, rtol=1e-6, atol=1e-9)
    (g_ref,) = torch.autograd.grad(reference, xr, torch.ones_like(reference))
    xl = x.clone().requires_grad_()
    with LanguageTransformer(attention=attention).context(m):
        out = m(xl)
        (g,) = torch.autograd.grad(out, xl, out.detach())                  # the seed is relevance: g = 1 at the output
    assert torch.equal(out.detach(), plain.detach())
    expected = xr.detach() * g_ref
    # transformers computes the scan in float32 (its .float() casts), the reference in float64
    torch.testing.assert_close(xl * g, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


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
