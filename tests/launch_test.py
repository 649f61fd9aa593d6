"""The main job end to end, and the errors a researcher gets for bad input."""

import json
import subprocess
import sys

import pytest

from configs import default
from spac_jax import experiment, validation

REPO_ROOT = default.REPO


@pytest.fixture
def config(tiny_checkpoints, tmp_path):
  config = default.get_config('smoke')
  config.model.path = str(tiny_checkpoints['target'])
  config.draft.path = str(tiny_checkpoints['draft'])
  return config


def test_run_writes_outputs_on_two_prompts(config, tmp_path):
  results = experiment.run(config, tmp_path / 'run')
  written = json.loads((tmp_path / 'run' / 'results.json').read_text())
  assert written == json.loads(json.dumps(results))
  for key in ('tokens_per_second', 'time_per_output_token_ms', 'mean_accepted_length',
              'acceptance_rate', 'expert_hit_rate', 'host_to_device_bytes',
              'cpu_expert_fraction', 'num_prompts', 'output_tokens', 'per_layer'):
    assert key in written, key
  assert written['num_prompts'] == 2
  lines = (tmp_path / 'run' / 'generations.jsonl').read_text().splitlines()
  assert len(lines) == 2
  record = json.loads(lines[0])
  assert record['id'] == 'HumanEval/0'
  assert sum(record['accepted_lengths']) == len(record['output_ids']) - 1
  assert written['output_tokens'] == sum(len(json.loads(l)['output_ids']) for l in lines)
  assert len(written['per_layer']) == 2
  resolved = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert resolved['offload']['policy'] == 'lru'


def test_autoregressive_run_has_unit_accepted_length(config, tmp_path):
  config.decode.mode = 'autoregressive'
  results = experiment.run(config, tmp_path / 'run')
  assert results['mean_accepted_length'] == 1.0
  assert results['acceptance_rate'] is None


@pytest.mark.parametrize('field, value, message', [
    ('offload.cache_ratio', 1.5, 'cache_ratio=1.5 is outside'),
    ('offload.cache_ratio', -0.1, 'cache_ratio=-0.1 is outside'),
    ('decode.draft_len', -2, 'draft_len=-2'),
    ('decode.mode', 'beam', "mode='beam'"),
    ('offload.policy', 'fifo', "policy='fifo' is unknown"),
    ('data.source', 'mmlu', "source='mmlu' is unknown"),
    ('data.overlong_prompts', 'drop', "overlong_prompts='drop'"),
    ('model.path', '/nonexistent/target', 'checkpoint directory not found'),
    ('draft.path', '/nonexistent/draft', 'draft.path'),
    ('spac.cost_model', 'guess', "cost_model='guess'"),
    ('spac.transfer_budget', -5, 'transfer_budget=-5'),
    ('spac.levels', 0, 'levels=0'),
    ('spac.transfer_amortization', 0.5, 'transfer_amortization=0.5'),
])
def test_invalid_field_is_named(config, tmp_path, field, value, message):
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(validation.ConfigError, match=message):
    experiment.run(config, tmp_path / 'run')


def test_invalid_hardware_profile_is_named(config, tmp_path):
  config.spac.profile.link_gbps = 0.0
  with pytest.raises(validation.ConfigError, match='link_gbps must be > 0'):
    experiment.run(config, tmp_path / 'run')


def test_spac_run_reports_scheduler_figures(config, tmp_path):
  config.offload.policy = 'spac'
  results = experiment.run(config, tmp_path / 'run')
  for key in ('solver_time_ms', 'prefetches', 'wasted_prefetches', 'transfer_stall_ms',
              'per_layer_threshold_last'):
    assert key in results, key
  assert results['cost_model']['source'] == 'profile'


def test_missing_prompt_file(config, tmp_path):
  config.data.source = 'jsonl'
  config.data.path = str(tmp_path / 'missing.jsonl')
  with pytest.raises(FileNotFoundError, match='missing.jsonl not found'):
    experiment.run(config, tmp_path / 'run')


@pytest.mark.parametrize('content, message', [('', 'contains no prompts'),
                                              ('{"text": "x"}\n', 'neither'),
                                              ('not json\n', 'not valid JSON')])
def test_bad_prompt_file(config, tmp_path, content, message):
  path = tmp_path / 'prompts.jsonl'
  path.write_text(content)
  config.data.source = 'jsonl'
  config.data.path = str(path)
  with pytest.raises(ValueError, match=message):
    experiment.run(config, tmp_path / 'run')


def test_overlong_prompt_rejected_or_truncated(config, tmp_path):
  path = tmp_path / 'prompts.jsonl'
  path.write_text(json.dumps({'prompt': 'x' * 500}) + '\n')
  config.data.source = 'jsonl'
  config.data.path = str(path)
  config.data.overlong_prompts = 'reject'
  with pytest.raises(ValueError, match='has 501 tokens'):
    experiment.run(config, tmp_path / 'reject')
  assert not (tmp_path / 'reject').exists()  # Rejected before anything was written.

  config.data.overlong_prompts = 'truncate'
  experiment.run(config, tmp_path / 'truncate')
  record = json.loads((tmp_path / 'truncate' / 'generations.jsonl').read_text())
  assert record['truncated']
  assert record['prompt_tokens'] == 128 - 8 - 4 - 1


def test_failed_rerun_keeps_previous_outputs(config, tmp_path):
  experiment.run(config, tmp_path / 'run')
  before = (tmp_path / 'run' / 'config.json').read_text()
  config.data.source = 'jsonl'
  config.data.path = str(tmp_path / 'missing.jsonl')
  with pytest.raises(FileNotFoundError):
    experiment.run(config, tmp_path / 'run')
  assert (tmp_path / 'run' / 'config.json').read_text() == before
  assert (tmp_path / 'run' / 'results.json').is_file()


def test_workdir_that_is_a_file_is_rejected(config, tmp_path):
  (tmp_path / 'file').write_text('')
  with pytest.raises(validation.ConfigError, match='is a file'):
    experiment.run(config, tmp_path / 'file')


def test_draft_len_beyond_context_names_both_fields(config, tmp_path):
  config.decode.draft_len = 2000
  with pytest.raises(validation.ConfigError, match='lower max_new_tokens or draft_len'):
    experiment.run(config, tmp_path / 'run')


@pytest.mark.parametrize('damage, message', [('truncate', 'Cannot restore parameters'),
                                             ('json', 'is not valid JSON'),
                                             ('fields', 'is incomplete')])
def test_damaged_checkpoint_is_named(config, tiny_checkpoints, tmp_path, damage, message):
  import shutil  # pylint: disable=import-outside-toplevel
  target = tmp_path / 'target'
  shutil.copytree(tiny_checkpoints['target'], target)
  if damage == 'truncate':
    largest = max((p for p in (target / 'params').rglob('*') if p.is_file()),
                  key=lambda p: p.stat().st_size)
    with open(largest, 'r+b') as f:
      f.truncate(100)
  elif damage == 'json':
    (target / 'model_config.json').write_text('{not json')
  else:
    (target / 'model_config.json').write_text('{"vocab_size": 259}')
  config.model.path = str(target)
  with pytest.raises(ValueError, match=message):
    experiment.run(config, tmp_path / 'run')


def test_spec_bench_prompts_use_first_turn(config, tmp_path):
  config.data.source = 'spec_bench'
  config.data.num_prompts = 1
  experiment.run(config, tmp_path / 'run')
  record = json.loads((tmp_path / 'run' / 'generations.jsonl').read_text())
  assert record['id'] == '81'
  assert record['prompt'].startswith('Compose an engaging travel blog post')


def launch(*args):
  return subprocess.run([sys.executable, '-m', 'spac_jax.launch', *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300)


def test_cli_unknown_field_is_one_line_error(tmp_path):
  result = launch('--config=configs/default.py', f'--workdir={tmp_path}',
                  '--config.decode.draft_lenght=3')
  assert result.returncode != 0
  assert "unknown config field 'draft_lenght' in ['--config.decode.draft_lenght']" in (
      result.stderr)
  assert 'Traceback' not in result.stderr


def test_cli_bad_value_is_one_line_error(tmp_path):
  result = launch('--config=configs/default.py', f'--workdir={tmp_path}',
                  '--config.offload.cache_ratio=2.0')
  assert result.returncode != 0
  assert 'cache_ratio=2.0 is outside [0, 1]' in result.stderr
  assert 'Traceback' not in result.stderr


def test_cli_end_to_end(tiny_checkpoints, tmp_path):
  result = launch('--config=configs/default.py:smoke', f'--workdir={tmp_path}',
                  f'--config.model.path={tiny_checkpoints["target"]}',
                  f'--config.draft.path={tiny_checkpoints["draft"]}',
                  '--config.offload.policy=on_demand')
  assert result.returncode == 0, result.stderr[-2000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['policy'] == 'on_demand'
  assert results['num_prompts'] == 2


def test_shipped_embedded_model_runs_two_prompts(tmp_path):
  config = default.get_config('smoke')
  results = experiment.run(config, tmp_path / 'run')
  assert results['num_prompts'] == 2
  assert results['output_tokens'] == 16
  # The trained draft agrees with the target on HumanEval code far more often than chance.
  assert results['mean_accepted_length'] > 1.5
