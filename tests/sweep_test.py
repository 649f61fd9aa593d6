"""Sweep launcher: grid parsing and a two-run sweep."""

import json

import pytest

from configs import default
from launch import plot, sweep


def test_parse_grid_types_values_like_config():
  config = default.get_config()
  grid = sweep.parse_grid(['offload.cache_ratio=0.1,0.5', 'spac.inertia=true,false'], config)
  assert grid == [('offload.cache_ratio', [0.1, 0.5]), ('spac.inertia', [True, False])]


@pytest.mark.parametrize('spec, message', [('offload.policy', 'expected'),
                                           ('offload.colour=red', "no field 'offload.colour'"),
                                           ('spac.inertia=maybe', 'Invalid boolean')])
def test_parse_grid_rejects_bad_spec(spec, message):
  with pytest.raises(ValueError, match=message):
    sweep.parse_grid([spec], default.get_config())


def test_two_run_sweep_writes_summary(tiny_checkpoints, tmp_path):
  config = default.get_config('smoke')
  config.model.path = str(tiny_checkpoints['target'])
  config.draft.path = str(tiny_checkpoints['draft'])
  config.data.num_prompts = 1
  rows = sweep.run_grid(config, [('offload.policy', ['lru', 'spac'])], tmp_path)
  sweep.write_summary(rows, tmp_path)
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
