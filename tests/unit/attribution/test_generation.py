"""lxt_ext.attribution.generation: a generated continuation explained from one forward, against the step-by-step
loop written out here (per generated token, a forward over the growing prefix with ``explain_batch`` and a seed
built in this file: the logit, the log-probability's gradient ``onehot - softmax`` or LXT's contrastive mask, times
the logits), under AttnLRP and CP-LRP, on LLaMA (RoPE, RMSNorm), GPT-2 (absolute positions, a tied head) and
Gemma 2 (a soft-capped head: tanh after the LM head). Also: the whole answer in one backward equals the sum of
the rows; CP-LRP rows sum to their seed's value on LLaMA (conservation: no biases, no position table);
no composite gives gradient x input of the loop's plain gradients; bad input named."""
import pytest
import torch
import transformers

from lxt_ext.attribution import explain_batch
from lxt_ext.attribution.generation import explain_generation
from lxt_ext.composites import LanguageTransformer

PROMPT, TOKENS = 7, 11


def tiny(kind):
    torch.manual_seed(0)
    if kind == 'llama':
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)
        model = transformers.LlamaForCausalLM(config)
    elif kind == 'gpt2':
        config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=0.5, attn_logit_softcapping=None)
        model = transformers.Gemma2ForCausalLM(config)
    model.config._attn_implementation = 'sdpa'
    return model.eval()


def loop_seed(kind, token):
    """The step loop's seed at the last position, written out."""
    def seed(output):
        z = output[:, -1]
        mask = torch.zeros_like(z)
        mask[:, token] = 1.
        if kind == 'log_prob':
            mask = mask - z.softmax(-1)
        elif kind == 'contrastive':
            mask = torch.where(mask == 1, 1., -1. / (z.shape[-1] - 1))
        full = torch.zeros_like(output)
        full[:, -1] = mask * z
        return full
    return seed


def step_loop(model, ids, attention, kind):
    """Per generated token: the prefix up to it explained for it, relevance summed over the embedding."""
    embeds = model.get_input_embeddings()(ids[None]).detach()
    rows = []
    for position in range(PROMPT, TOKENS):
        composite = LanguageTransformer(attention=attention) if attention else None
        target = loop_seed(kind, ids[position].item()) if attention else ids[position].item()
        e = explain_batch(model, embeds[:, :position], composite, target=target,
                          forward=lambda m, x: m(inputs_embeds=x).logits)
        relevance = e.relevance if attention else embeds[:, :position] * e.relevance  # plain gradient: x * grad
        rows.append(torch.nn.functional.pad(relevance.sum(-1)[0], (0, TOKENS - position)))
    return torch.stack(rows)


@pytest.mark.parametrize('model_kind', ['llama', 'gpt2', 'gemma2'])
@pytest.mark.parametrize('attention', ['attnlrp', 'cp'])
@pytest.mark.parametrize('kind', ['logit', 'log_prob', 'contrastive'])
def test_one_forward_equals_the_step_loop(model_kind, attention, kind):
    model = tiny(model_kind)
    ids = torch.randint(0, 64, (TOKENS,), generator=torch.Generator().manual_seed(1))
    expected = step_loop(model, ids, attention, kind)
    g = explain_generation(model, ids, PROMPT, LanguageTransformer(attention=attention), target=kind)
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(g.matrix, expected, rtol=0, atol=1e-5 * scale)
    assert torch.equal(g.matrix.tril(PROMPT - 1), g.matrix)  # nothing at or after a row's own token
    whole = explain_generation(model, ids[None], PROMPT, LanguageTransformer(attention=attention), target=kind,
                               matrix=False)
    assert whole.matrix is None
    torch.testing.assert_close(whole.relevance, expected.sum(0), rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(g.relevance, expected.sum(0), rtol=0, atol=1e-5 * scale)
    logits = model(ids[None]).logits[0, PROMPT - 1:-1].detach()
    log_probs = logits.log_softmax(-1).gather(1, ids[PROMPT:, None])[:, 0]
    torch.testing.assert_close(g.log_probs, log_probs, rtol=1e-5, atol=1e-6)
    if attention == 'cp' and model_kind == 'llama':  # GPT-2's position table takes a share; Gemma 2's tanh cap
        torch.testing.assert_close(g.matrix.sum(1), g.scores, rtol=1e-4, atol=1e-6)


def test_scores_are_the_explained_values():
    model = tiny('llama')
    ids = torch.randint(0, 64, (TOKENS,), generator=torch.Generator().manual_seed(2))
    z = model(ids[None]).logits[0, PROMPT - 1:-1].detach()
    chosen = ids[PROMPT:]
    rows = torch.arange(len(chosen))
    expected = {'logit': z[rows, chosen],
                'log_prob': z[rows, chosen] - (z.softmax(-1) * z).sum(-1),
                'contrastive': z[rows, chosen] - (z.sum(-1) - z[rows, chosen]) / (z.shape[-1] - 1)}
    for kind, value in expected.items():
        g = explain_generation(model, ids, PROMPT, LanguageTransformer(attention='cp'), target=kind, matrix=False)
        torch.testing.assert_close(g.scores, value, rtol=1e-5, atol=1e-6)


def test_no_composite_is_gradient_times_input_of_the_loop():
    model = tiny('llama')
    ids = torch.randint(0, 64, (TOKENS,), generator=torch.Generator().manual_seed(3))
    expected = step_loop(model, ids, None, 'logit')
    g = explain_generation(model, ids, PROMPT, None)
    torch.testing.assert_close(g.matrix, expected, rtol=0, atol=1e-5 * expected.abs().max())


def test_bad_input_is_named():
    model = tiny('llama')
    ids = torch.randint(0, 64, (TOKENS,))
    composite = LanguageTransformer()
    with pytest.raises(TypeError, match='integer tensor'):
        explain_generation(model, ids.float(), PROMPT, composite)
    with pytest.raises(ValueError, match='one sequence at a time'):
        explain_generation(model, ids.expand(2, -1), PROMPT, composite)
    for length in (0, TOKENS):
        with pytest.raises(ValueError, match='prompt_length'):
            explain_generation(model, ids, length, composite)
    with pytest.raises(ValueError, match='target must be one of'):
        explain_generation(model, ids, PROMPT, composite, target='probability')
