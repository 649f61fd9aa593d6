"""The experiment runner on Hugging Face checkpoints: format detection, tokenizer, errors."""

import json
import subprocess
import sys

import pytest

import hf_models
from configs import hf_common, qwen3_30b_a3b
from spac_jax import experiment, loading, validation
from spac_jax.data.hf_tokenizer import HFTokenizer
from spac_jax.data.prompts import Prompt

REPO_ROOT = hf_common.default.REPO


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """A tiny Qwen3-MoE target with a tokenizer, a Qwen3 draft, and a draft of another vocab."""
  root = tmp_path_factory.mktemp('hf_checkpoints')
  target = hf_models.save(hf_models.build('qwen3_moe', seed=11), root / 'target')
  hf_models.save_tokenizer(target, bos=False)  # Qwen-style: prompts get no BOS.
  draft = hf_models.save(hf_models.build('qwen3', seed=12), root / 'draft')
  other = hf_models.save(hf_models.build('qwen3', seed=13, vocab_size=128), root / 'other')
  return {'target': target, 'draft': draft, 'other_vocab': other}


@pytest.fixture
def config(checkpoints, tmp_path):
  config = qwen3_30b_a3b.get_config('smoke')
  config.model.path = str(checkpoints['target'])
  config.draft.path = str(checkpoints['draft'])
  config.model.dtype = 'float32'
  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text(''.join(json.dumps({'prompt': f'w{i} w{i + 7} w{i + 3}'}) + '\n'
                             for i in range(3, 5)))
  config.data.source = 'jsonl'
  config.data.path = str(prompts)
  return config


def test_tokenizer_with_bos(tmp_path):
  hf_models.save_tokenizer(tmp_path, bos=True)
  (tmp_path / 'config.json').write_text('{}')
  tokenizer = HFTokenizer(tmp_path)
  assert tokenizer.encode('w5 w9') == [0, 5, 9]
  assert tokenizer.encode('w5 w9', add_bos=False) == [5, 9]
  assert tokenizer.decode([0, 5, 9, 1]) == 'w5 w9'
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.eos_ids, tokenizer.pad_id) == (
      0, 1, (1, 2), 2)
  assert tokenizer.vocab_size == hf_models.VOCAB


def test_tokenizer_without_bos_encodes_as_is(tmp_path):
  hf_models.save_tokenizer(tmp_path, bos=False)
  (tmp_path / 'config.json').write_text('{}')
  tokenizer = HFTokenizer(tmp_path)
  assert tokenizer.bos_id is None
  assert tokenizer.encode('w5 w9') == [5, 9]


def test_tokenizer_chat_template(tmp_path):
  hf_models.save_tokenizer(tmp_path, bos=True)
  (tmp_path / 'config.json').write_text('{}')
  template = ("{{ bos_token }}{% for m in messages %}w{{ 10 + loop.index }} {{ m['content'] }}"
              "{% endfor %}{% if add_generation_prompt %} w20{% endif %}")
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'chat_template': template}))
  tokenizer = HFTokenizer(tmp_path, chat_template='checkpoint')
  assert tokenizer.encode('w5 w9') == [0, 11, 5, 9, 20]


def test_tokenizer_reads_chat_template_jinja(tmp_path):
  hf_models.save_tokenizer(tmp_path, bos=True)
  (tmp_path / 'config.json').write_text('{}')
  (tmp_path / 'chat_template.jinja').write_text(
      "{% for m in messages %}w12 {{ m['content'] }}{% endfor %}")
  # The template writes every special token itself, so none is added around it.
  assert HFTokenizer(tmp_path, chat_template='checkpoint').encode('w5') == [12, 5]


def test_invalid_chat_template_names_file(tmp_path):
  hf_models.save_tokenizer(tmp_path, bos=True)
  (tmp_path / 'config.json').write_text('{}')
  (tmp_path / 'chat_template.jinja').write_text('{% for m in messages %}{{ m }')
  with pytest.raises(ValueError, match='chat_template.jinja is invalid'):
    HFTokenizer(tmp_path, chat_template='checkpoint')


def test_tokenizer_errors_name_file(tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match='tokenizer.json not found'):
    HFTokenizer(tmp_path)
  hf_models.save_tokenizer(tmp_path)
  (tmp_path / 'generation_config.json').unlink()
  with pytest.raises(ValueError, match='sets no eos_token_id'):
    HFTokenizer(tmp_path)
  hf_models.save_tokenizer(tmp_path)
  with pytest.raises(ValueError,
                     match='chat_template.jinja or a chat_template string in .*tokenizer_config'):
    HFTokenizer(tmp_path, chat_template='checkpoint')


def test_truncation_without_bos_keeps_the_end(tmp_path):
  hf_models.save_tokenizer(tmp_path, bos=False)
  (tmp_path / 'config.json').write_text('{}')
  ids, truncated = experiment.prepare_prompt(Prompt('p', 'w3 w4 w5 w6 w7'), HFTokenizer(tmp_path),
                                             3, 'truncate')
  assert (ids, truncated) == ([5, 6, 7], True)


def test_draft_with_other_tokenizer_is_rejected(config, checkpoints, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  draft = tmp_path / 'draft'
  shutil.copytree(checkpoints['draft'], draft)
  hf_models.save_tokenizer(draft, bos=False)
  vocab = json.loads((draft / 'tokenizer.json').read_text())
  words = vocab['model']['vocab']
  words['w3'], words['w4'] = words['w4'], words['w3']  # Same size, different mapping.
  (draft / 'tokenizer.json').write_text(json.dumps(vocab))
  config.draft.path = str(draft)
  with pytest.raises(validation.ConfigError, match='maps tokens differently'):
    experiment.run(config, tmp_path / 'run')


def test_dense_target_is_rejected(config, checkpoints, tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  dense = tmp_path / 'dense'
  shutil.copytree(checkpoints['draft'], dense)
  hf_models.save_tokenizer(dense, bos=False)
  config.model.path = str(dense)
  config.decode.mode = 'autoregressive'
  with pytest.raises(validation.ConfigError, match='is a dense model without routed experts'):
    experiment.run(config, tmp_path / 'run')


def test_format_detection(checkpoints, tiny_checkpoints):
  config = qwen3_30b_a3b.get_config()
  config.model.format = 'auto'
  config.model.path = str(checkpoints['target'])
  assert loading.checkpoint_format(config.model) == 'hf'
  config.model.path = str(tiny_checkpoints['target'])
  assert loading.checkpoint_format(config.model) == 'orbax'


@pytest.mark.parametrize('mode', ['speculative', 'autoregressive'])
def test_run_on_hf_checkpoints(config, tmp_path, mode):
  config.decode.mode = mode
  results = experiment.run(config, tmp_path / 'run')
  assert results['num_prompts'] == 2
  assert [entry['model_layer'] for entry in results['per_layer']] == [1, 2]  # Layer 0 is dense.
  assert results['total_experts'] == 2 * 16
  records = [json.loads(line) for line in
             (tmp_path / 'run' / 'generations.jsonl').read_text().splitlines()]
  assert records[0]['prompt_tokens'] == 3
  assert all(word.startswith('w') for word in records[0]['output'].split())


def test_run_with_bf16_and_auto_format(config, tmp_path):
  config.model.dtype = 'bfloat16'
  config.model.format = config.draft.format = 'auto'
  results = experiment.run(config, tmp_path / 'run')
  assert results['output_tokens'] > 0


def test_draft_with_other_vocabulary_is_rejected(config, checkpoints, tmp_path):
  config.draft.path = str(checkpoints['other_vocab'])
  with pytest.raises(validation.ConfigError,
                     match=r'Draft .*other.* has a vocabulary of 128 tokens but the target '
                           r'.*target has 96'):
    experiment.run(config, tmp_path / 'run')


@pytest.mark.parametrize('field, value, message', [
    ('model.path', '', 'config.model.path is empty'),
    ('draft.path', '', 'config.draft.path is empty'),
    ('model.format', 'gguf', "config.model.format='gguf' is invalid"),
    ('model.dtype', 'int4', "config.model.dtype='int4' is invalid"),
    ('data.chat_template', 'chatml', "config.data.chat_template='chatml' is invalid"),
    ('model.max_seq_len', -1, 'config.model.max_seq_len=-1 is invalid'),
])
def test_invalid_hf_field_is_named(config, tmp_path, field, value, message):
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(validation.ConfigError, match=message):
    experiment.run(config, tmp_path / 'run')


def test_autoregressive_needs_no_draft_path(config, tmp_path):
  config.draft.path = ''
  config.decode.mode = 'autoregressive'
  assert experiment.run(config, tmp_path / 'run')['num_prompts'] == 2


def test_cli_empty_model_path(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'spac_jax.launch',
                           '--config=configs/mixtral_8x7b.py', f'--workdir={tmp_path}'],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'config.model.path is empty' in result.stderr
  assert 'Traceback' not in result.stderr
