"""Sweep launcher: grid parsing and a two-run sweep."""

import json

import pytest

from configs import default
from launch import plot, sweep


def test_parse_grid_types_values_like_config():
  config = default.get_config()
  grid = sweep.parse_grid(['offload.cache_ratio=0.1,0.5', 'spac.inertia=true,false'], config)
  assert grid == [('offload.cache_ratio', [0.1, 0.5]), ('spac.inertia', [True, False])]


def test_parse_grid_reaches_nested_fields():
  grid = sweep.parse_grid(['spac.profile.link_gbps=10,25'], default.get_config())
  assert grid == [('spac.profile.link_gbps', [10.0, 25.0])]


@pytest.mark.parametrize('spec, message', [('offload.policy', 'expected'),
                                           ('offload.colour=red', "no field 'offload.colour'"),
                                           ('spac.inertia=maybe', 'Invalid boolean'),
                                           ('offload.policy=lru,', 'stray comma'),
                                           ('decode.draft_len=2,x', "'x' is not a valid int")])
def test_parse_grid_rejects_bad_spec(spec, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_grid([spec], default.get_config())


def test_duplicate_grid_field_is_rejected():
  with pytest.raises(ValueError, match='swept twice'):
    sweep.parse_grid(['offload.policy=lru', 'offload.policy=spac'], default.get_config())


def test_invalid_grid_point_fails_before_any_run(tmp_path):
  grid = sweep.parse_grid(['offload.cache_ratio=0.25,1.5'], default.get_config('smoke'))
  with pytest.raises(ValueError, match='cache_ratio=1.5 is outside'):
    sweep.run_grid(default.get_config('smoke'), grid, tmp_path)
  assert not list(tmp_path.iterdir())


def test_two_run_sweep_writes_summary(tiny_checkpoints, tmp_path):
  config = default.get_config('smoke')
  config.model.path = str(tiny_checkpoints['target'])
  config.draft.path = str(tiny_checkpoints['draft'])
  config.data.num_prompts = 1
  sweep.run_grid(config, [('offload.policy', ['lru', 'spac'])], tmp_path)
  lines = (tmp_path / 'summary.jsonl').read_text().splitlines()
  assert [json.loads(line)['offload.policy'] for line in lines] == ['lru', 'spac']
  table = (tmp_path / 'summary.md').read_text().splitlines()
  assert len(table) == 4
  assert table[2].startswith('| offload.policy=lru |')
  assert (tmp_path / 'offload.policy=spac' / 'results.json').is_file()
  plot.plot(plot.read_rows(tmp_path / 'summary.jsonl'), tmp_path / 'summary.png')
  assert (tmp_path / 'summary.png').stat().st_size > 10_000


def test_plot_rejects_missing_summary(tmp_path):
  with pytest.raises(FileNotFoundError, match='run launch.sweep first'):
    plot.read_rows(tmp_path / 'summary.jsonl')
