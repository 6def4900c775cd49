"""``lxt-ext explain-text`` on local Hugging Face folders (tiny random-weight models, tokenizers trained here on a
few sentences: byte-level BPE with GPT-2, SentencePiece-style BPE with LLaMA, WordPiece with [CLS]/[SEP] under a
LLaMA body), offline. The matrix it writes is checked against the step-by-step loop written out (``explain_batch``
on each prefix, the generated token's logit), the whole answer against the rows' sum, CP-LRP rows against the
logits (conservation on LLaMA), the generated text against transformers' greedy generation, and the page in
headless Chromium (the heatmap in a screenshot, ``#token=N`` showing that token's row)."""
import csv
import json
import os
import re
import shutil
import subprocess

import pytest
import torch
import transformers

from conftest import require
from lxt_ext import cli
from lxt_ext.attribution import explain_batch
from lxt_ext.composites import LanguageTransformer

CORPUS = ['The quick brown fox jumps over the lazy dog.', 'A journey of a thousand miles begins with one step.',
          'Relevance flows from the output back to the input tokens.', 'Every layer keeps the sum of relevance.',
          'Paris is the capital of France, and Berlin is the capital of Germany.'] * 4
PROMPT = 'The capital of France is'


def tokenizer_of(style):
    from tokenizers import (ByteLevelBPETokenizer, SentencePieceBPETokenizer, BertWordPieceTokenizer)
    if style == 'byte_level':
        raw = ByteLevelBPETokenizer()
        raw.train_from_iterator(CORPUS, vocab_size=300, special_tokens=['<|endoftext|>'])
        return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token='<|endoftext|>',
                                                    bos_token='<|endoftext|>')
    if style == 'sentencepiece':
        raw = SentencePieceBPETokenizer()
        raw.train_from_iterator(CORPUS, vocab_size=200, special_tokens=['<unk>', '<s>', '</s>'])
        from tokenizers.processors import TemplateProcessing
        raw.post_processor = TemplateProcessing(single='<s> $A', special_tokens=[('<s>', raw.token_to_id('<s>'))])
        return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token='<s>', eos_token='</s>',
                                                    unk_token='<unk>')
    raw = BertWordPieceTokenizer()
    raw.train_from_iterator(CORPUS, vocab_size=200)
    from tokenizers.processors import TemplateProcessing
    raw.post_processor = TemplateProcessing(single='[CLS] $A [SEP]', special_tokens=[
        ('[CLS]', raw.token_to_id('[CLS]')), ('[SEP]', raw.token_to_id('[SEP]'))])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=raw, cls_token='[CLS]', sep_token='[SEP]',
                                                unk_token='[UNK]', pad_token='[PAD]', mask_token='[MASK]')


def model_folder(tmp_path, style):
    """A saved tiny causal LM with the ``style`` tokenizer."""
    tokenizer = tokenizer_of(style)
    torch.manual_seed(0)
    vocab = len(tokenizer)
    if style == 'byte_level':
        end = tokenizer.eos_token_id
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4,
                                                                     n_positions=64, bos_token_id=end,
                                                                     eos_token_id=end))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, bos_token_id=None, eos_token_id=None, pad_token_id=None))
    folder = tmp_path / style
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model.eval(), tokenizer


def loop_rows(model, ids, prompt_length):
    """The step-by-step loop written out: each prefix explained for the next token's logit."""
    embeds = model.get_input_embeddings()(ids[None]).detach()
    rows = []
    for position in range(prompt_length, len(ids)):
        e = explain_batch(model, embeds[:, :position], LanguageTransformer(attention='cp'), target=int(ids[position]),
                          forward=lambda m, x: m(inputs_embeds=x).logits)
        rows.append(torch.nn.functional.pad(e.relevance.sum(-1)[0], (0, len(ids) - position)))
    return torch.stack(rows)


def read_outputs(out):
    record = json.loads((out / 'tokens.json').read_text(encoding='utf-8'))
    with open(out / 'matrix.csv', encoding='utf-8') as file:
        rows = list(csv.reader(file))
    matrix = torch.tensor([[float(v) for v in row[3:]] for row in rows[1:]])
    return record, matrix, rows


@pytest.mark.parametrize('style', ['byte_level', 'sentencepiece', 'wordpiece'])
def test_generates_and_explains_with_every_tokenizer_style(tmp_path, style, capsys):
    folder, model, tokenizer = model_folder(tmp_path, style)
    out = tmp_path / 'out'
    assert cli.main(['explain-text', str(folder), '--prompt', PROMPT, '--max-new-tokens', '4', '--attention', 'cp',
                     '--out', str(out), '--quiet']) == 0
    assert 'page.html' in capsys.readouterr().out
    record, matrix, rows = read_outputs(out)
    ids = torch.tensor(record['ids'])
    prompt_length = record['prompt_length']
    expected_prompt = tokenizer(PROMPT, return_tensors='pt')['input_ids'][0]
    if style == 'wordpiece':
        assert tokenizer.convert_ids_to_tokens(int(expected_prompt[-1])) == '[SEP]'
        expected_prompt = expected_prompt[:-1]  # the answer continues the text, not after [SEP]
        assert record['tokens'][0] == '[CLS]'
    assert ids[:prompt_length].tolist() == expected_prompt.tolist()
    greedy = model.generate(expected_prompt[None], attention_mask=torch.ones_like(expected_prompt)[None],
                            do_sample=False, max_new_tokens=4,
                            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id or 0)[0]
    assert ids.tolist() == greedy.tolist()
    assert record['tokens'] == tokenizer.convert_ids_to_tokens(ids.tolist())
    assert [row[2] for row in rows[1:]] == record['tokens'][prompt_length:]
    expected = loop_rows(model, ids, prompt_length)
    torch.testing.assert_close(matrix, expected, rtol=0, atol=1e-5 * expected.abs().max())
    torch.testing.assert_close(torch.tensor(record['relevance']), expected.sum(0), rtol=0,
                               atol=1e-5 * expected.abs().max())
    logits = model(ids[None]).logits[0, prompt_length - 1:-1].detach()
    chosen = logits.gather(1, ids[prompt_length:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(record['scores']), chosen, rtol=1e-5, atol=1e-6)
    if style != 'byte_level':  # LLaMA: no biases, no position table; CP-LRP conserves each row
        torch.testing.assert_close(matrix.sum(1), chosen, rtol=1e-3, atol=1e-5)
    page = (out / 'page.html').read_text(encoding='utf-8')
    assert '<script' in page and 'token' in page


def test_the_page_opens_on_the_row_its_fragment_names(tmp_path):
    """The written page in headless Chromium at ``#token=1``: every token shows its relevance for generated
    token 1 (matrix.csv's row), that token is selected; without a fragment, the whole answer."""
    binary = shutil.which('chromium') or shutil.which('chromium-browser')
    require(binary is not None, 'chromium is not installed (Debian: apt-get install chromium fonts-dejavu-core)')
    folder, _, _ = model_folder(tmp_path, 'wordpiece')
    out = tmp_path / 'out'
    assert cli.main(['explain-text', str(folder), '--prompt', PROMPT, '--max-new-tokens', '3', '--out', str(out),
                     '--quiet']) == 0
    record, matrix, _ = read_outputs(out)

    def shown(fragment):
        dom = subprocess.run([binary, '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
                              f'--user-data-dir={tmp_path / "profile"}', '--virtual-time-budget=2000', '--dump-dom',
                              (out / 'page.html').as_uri() + fragment],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        row = re.search(r'<body[^>]*data-row="([^"]+)"', dom).group(1)
        values = [float(v) for v in re.findall(r'data-shown-relevance="([^"]+)"', dom)]
        selected = [int(i) for i in re.findall(r'data-index="(\d+)"[^>]*data-selected="true"', dom)]
        return row, torch.tensor(values), selected

    row, values, selected = shown('#token=1')
    assert row == '1' and selected == [record['prompt_length'] + 1]
    torch.testing.assert_close(values, matrix[1], rtol=1e-6, atol=1e-9)
    row, values, selected = shown('')
    assert row == 'whole' and selected == []
    torch.testing.assert_close(values, torch.tensor(record['relevance']), rtol=1e-6, atol=1e-9)


def test_a_given_target_is_explained_and_a_rerun_keeps_other_files(tmp_path):
    folder, model, tokenizer = model_folder(tmp_path, 'sentencepiece')
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    prompt_file = tmp_path / 'prompt.txt'
    prompt_file.write_text(PROMPT, encoding='utf-8')
    for _ in range(2):
        assert cli.main(['explain-text', str(folder), '--prompt-file', str(prompt_file), '--target', ' Paris.',
                         '--score', 'log_prob', '--out', str(out), '--quiet']) == 0
    record, matrix, _ = read_outputs(out)
    answer = tokenizer(' Paris.', add_special_tokens=False)['input_ids']
    assert record['ids'][record['prompt_length']:] == answer and matrix.shape[0] == len(answer)
    assert record['score'] == 'log_prob'
    assert (out / 'notes.txt').read_text() == 'mine'
    assert cli.main(['explain-text', str(folder), '--prompt', PROMPT, '--target', ' Paris.', '--no-matrix',
                     '--out', str(out), '--quiet']) == 0
    assert not (out / 'matrix.csv').exists() and json.loads((out / 'tokens.json').read_text())['matrix'] is None


def test_bad_input_is_named(tmp_path, capsys):
    folder, _, _ = model_folder(tmp_path, 'sentencepiece')
    cases = [([str(tmp_path / 'missing'), '--prompt', 'x'], 'no such model folder'),
             ([str(tmp_path), '--prompt', 'x'], 'no config.json'),
             ([str(folder), '--prompt', ''], 'the prompt is empty'),
             ([str(folder), '--prompt-file', str(tmp_path / 'none.txt')], 'cannot read the prompt file'),
             ([str(folder), '--prompt', 'x', '--max-new-tokens', '0'], '--max-new-tokens must be at least 1')]
    for arguments, message in cases:
        assert cli.main(['explain-text', *arguments, '--out', str(tmp_path / 'o'), '--quiet']) == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'o')
