"""lxt_ext.inseq: AttnLRP and CP-LRP as inseq methods (inseq 0.7.1, a test-only dependency), each generation
step's attribution against lxt_ext's own relevance computed without inseq: ``explain_generation``'s matrix rows
(one forward over prompt + answer; targets 'logit' and 'log_prob') and ``explain_batch`` on each prefix
(inseq's default target, the probability). Tiny random-weight LLaMA and GPT-2, a word-level tokenizer built here."""
import importlib
import sys

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from conftest import assert_rel_close, require_module

inseq = require_module('inseq')

import lxt_ext.inseq  # noqa: E402,F401  (registers the methods)
from lxt_ext import explain_batch  # noqa: E402
from lxt_ext.attribution.generation import explain_generation  # noqa: E402
from lxt_ext.composites import LanguageTransformer  # noqa: E402

WORDS = ['<pad>', '<unk>', '<s>', '</s>'] + 'the a cat dog sat on mat and ran to house red big small is was'.split()
PROMPT = 'the cat sat'
ANSWER = 'on the red mat'
METHODS = {'attnlrp': 'attnlrp', 'cp_lrp': 'cp'}  # inseq's method name -> LanguageTransformer's attention


def tokenizer():
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token='<unk>'))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins the words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token='<unk>', pad_token='<pad>',
                                                bos_token='<s>', eos_token='</s>')


def tiny_model(family):
    torch.manual_seed(0)
    ids = dict(vocab_size=len(WORDS), bos_token_id=2, eos_token_id=3, pad_token_id=0)
    if family == 'llama':
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                          **ids)
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, initializer_range=0.2, **ids)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope='module')
def tok():
    return tokenizer()


def probability_rows(model, ids, prompt_length, attention):
    """The relevance of inseq's default target, each step's probability ``p_t``, from lxt_ext's front door on
    each prefix: LXT's seed, the logits times the gradient of ``p_t`` (``p_t (onehot_t - p)``) at the last
    position, as relevance."""
    rows = []
    for position in range(prompt_length, ids.shape[0]):
        token = ids[position]

        def seed(logits):
            z = logits[:, -1]
            p = z.softmax(-1)
            gradient = -p[:, token, None] * p
            gradient[:, token] += p[:, token]
            seeds = torch.zeros_like(logits)
            seeds[:, -1] = z * gradient
            return seeds

        embeds = model.get_input_embeddings()(ids[None, :position]).detach()
        e = explain_batch(model, embeds, LanguageTransformer(attention=attention), target=seed,
                          forward=lambda m, x: m(inputs_embeds=x).logits)
        rows.append(torch.nn.functional.pad(e.relevance[0].sum(-1), (0, ids.shape[0] - position)))
    return torch.stack(rows)


def oracle(model, ids, prompt_length, attention, target, **options):
    """``(answer, tokens)``: row i every token's relevance for generated token i (zero from it on)."""
    if target == 'probability':
        return probability_rows(model, ids, prompt_length, attention)
    composite = LanguageTransformer(attention=attention, **options)
    return explain_generation(model, ids, prompt_length, composite, target=target).matrix


def check_steps(attribution, rows, prompt_length):
    """inseq's target attributions ``(tokens, steps)``: step i's column equals row i on the prefix, NaN after."""
    table = attribution.target_attributions
    assert attribution.source_attributions is None  # decoder-only: everything is the target prefix
    assert table.shape == (rows.shape[1], rows.shape[0])
    for i in range(rows.shape[0]):
        prefix = prompt_length + i
        assert_rel_close(table[:prefix, i], rows[i, :prefix], 1e-5)
        assert torch.isnan(table[prefix:, i]).all()


# inseq's attributed function (and its arguments) -> explain_generation's target
TARGETS = {'logit': ('logit', {}, 'logit'), 'probability': ('probability', {}, 'probability'),
           'logprob': ('probability', {'logprob': True}, 'log_prob')}


@pytest.mark.parametrize('target', list(TARGETS))
@pytest.mark.parametrize('method', list(METHODS))
@pytest.mark.parametrize('family', ['llama', 'gpt2'])
def test_steps_equal_lxt_ext_relevance(family, method, target, tok):
    model = tiny_model(family)
    attributed_fn, fn_args, oracle_target = TARGETS[target]
    inseq_model = inseq.load_model(model, method, tokenizer=tok)
    out = inseq_model.attribute(PROMPT, generated_texts=f'{PROMPT} {ANSWER}', attributed_fn=attributed_fn,
                                attributed_fn_args=fn_args, step_scores=['logit'], show_progress=False)
    assert isinstance(out, inseq.FeatureAttributionOutput)
    assert out.info['attribution_method'] == method
    attribution = out.sequence_attributions[0]
    ids = torch.tensor(tok(f'{PROMPT} {ANSWER}').input_ids)
    prompt_length = len(tok(PROMPT).input_ids)
    assert [t.token for t in attribution.target] == f'{PROMPT} {ANSWER}'.split()
    rows = oracle(model, ids, prompt_length, METHODS[method], oracle_target)
    check_steps(attribution, rows, prompt_length)
    # the step scores come from inseq's own (unmodified) forward: the generated tokens' logits
    logits = explain_generation(model, ids, prompt_length, None).scores
    torch.testing.assert_close(attribution.step_scores['logit'], logits, rtol=1e-5, atol=1e-6)


def test_batch_and_composite_options(tok):
    """Two sequences of one length in one batch, each its own relevance; load_model's extra keyword arguments
    reach LanguageTransformer (here epsilon)."""
    model = tiny_model('llama')
    prompts, answers = ['the cat sat', 'a dog ran'], ['on the mat', 'to the house']
    inseq_model = inseq.load_model(model, 'attnlrp', tokenizer=tok, epsilon=0.01)
    assert inseq_model.attribution_method.composite.options.linear is not None
    out = inseq_model.attribute(prompts, generated_texts=[f'{p} {a}' for p, a in zip(prompts, answers)],
                                attributed_fn='logit', show_progress=False)
    for prompt, answer, attribution in zip(prompts, answers, out.sequence_attributions):
        ids = torch.tensor(tok(f'{prompt} {answer}').input_ids)
        rows = oracle(model, ids, 3, 'attnlrp', 'logit', epsilon=0.01)
        check_steps(attribution, rows, 3)
    with pytest.raises(AssertionError):  # epsilon = 0.01 matters: the default composite differs
        check_steps(out.sequence_attributions[0], oracle(model, torch.tensor(tok('the cat sat on the mat').input_ids),
                                                         3, 'attnlrp', 'logit'), 3)


def test_outputs_show_aggregate_save_and_positions(tok, tmp_path):
    model = tiny_model('llama')
    inseq_model = inseq.load_model(model, 'cp_lrp', tokenizer=tok)
    out = inseq_model.attribute(PROMPT, generated_texts=f'{PROMPT} {ANSWER}', attributed_fn='logit',
                                show_progress=False)
    html = out.show(display=False, return_html=True)
    assert 'mat' in html
    attribution = out.sequence_attributions[0]
    # token-level relevance: inseq's default aggregation leaves it as it is (no norm, no normalisation)
    aggregated = attribution.aggregate()
    torch.testing.assert_close(aggregated.target_attributions, attribution.target_attributions, equal_nan=True)
    merged = attribution.aggregate('spans', target_spans=(0, 2))  # 'the cat' as one token
    assert merged.target_attributions.shape[0] == attribution.target_attributions.shape[0] - 1
    out.save(tmp_path / 'out.json')
    loaded = inseq.FeatureAttributionOutput.load(tmp_path / 'out.json').sequence_attributions[0]
    torch.testing.assert_close(loaded.target_attributions, attribution.target_attributions, equal_nan=True)
    # generated tokens 1 and 2 only (attr_pos_start/attr_pos_end): the same columns
    part = inseq_model.attribute(PROMPT, generated_texts=f'{PROMPT} {ANSWER}', attributed_fn='logit',
                                 attr_pos_start=4, attr_pos_end=6, show_progress=False).sequence_attributions[0]
    torch.testing.assert_close(part.target_attributions, attribution.target_attributions[:6, 1:3], equal_nan=True)


def test_methods_listed():
    methods = inseq.list_feature_attribution_methods()
    assert 'attnlrp' in methods and 'cp_lrp' in methods


def hooks_and_swaps(model):
    """Every module's hooks, swapped forwards and the parameters' requires_grad."""
    state = []
    for name, module in model.named_modules():
        for table in ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks', '_backward_pre_hooks',
                      '_forward_hooks_with_kwargs', '_forward_pre_hooks_with_kwargs', '_forward_hooks_always_called'):
            state.append((name, table, tuple(getattr(module, table, {}))))
        state.append((name, 'forward' in vars(module)))
    state += [(name, p.requires_grad) for name, p in model.named_parameters()]
    return state


def output_and_gradient(model, ids):
    x = model.get_input_embeddings()(ids[None]).detach().requires_grad_()
    logits = model(inputs_embeds=x).logits
    logits[0, -1].max().backward()
    return logits.detach(), x.grad


@pytest.mark.parametrize('method', list(METHODS))
def test_model_unchanged(method, tok, monkeypatch):
    model = tiny_model('llama')
    ids = torch.tensor(tok(f'{PROMPT} {ANSWER}').input_ids)
    before, reference = hooks_and_swaps(model), output_and_gradient(model, ids)
    inseq_model = inseq.load_model(model, method, tokenizer=tok)
    inseq_model.attribute(PROMPT, generated_texts=f'{PROMPT} {ANSWER}', show_progress=False)
    assert hooks_and_swaps(model) == before
    for ours, theirs in zip(output_and_gradient(model, ids), reference):
        assert torch.equal(ours, theirs)
    # an error inside a step (the composite registered) leaves nothing behind either
    captum = inseq_model.attribution_method.method

    def fail(*args, **kwargs):
        raise RuntimeError('failure inside the step')

    monkeypatch.setattr(captum, 'attribute', fail)
    with pytest.raises(RuntimeError, match='inside the step'):
        inseq_model.attribute(PROMPT, generated_texts=f'{PROMPT} {ANSWER}', show_progress=False)
    assert hooks_and_swaps(model) == before


@pytest.mark.parametrize('attributed_fn', ['entropy', 'contrast_logits_diff', lambda args: args.forward_output])
def test_unsupported_attributed_fn_refused(attributed_fn, tok):
    inseq_model = inseq.load_model(tiny_model('llama'), 'attnlrp', tokenizer=tok)
    with pytest.raises(ValueError, match=r"explains inseq's attributed functions \('logit', 'probability'\)"):
        inseq_model.attribute(PROMPT, generated_texts=f'{PROMPT} {ANSWER}', attributed_fn=attributed_fn,
                              show_progress=False)


def test_missing_inseq_is_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, 'inseq', None)  # `import inseq` raises ImportError
    for name in [name for name in sys.modules if name.startswith('inseq.')] + ['lxt_ext.inseq']:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r'pip install --no-deps -r requirements-inseq\.txt'):
        importlib.import_module('lxt_ext.inseq')
