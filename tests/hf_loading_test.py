"""Hugging Face checkpoint loading: field spellings, tensor layouts, dtypes, memory, errors."""

import copy
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

import hf_models
from spac_jax.models import hf, hf_config
from spac_jax.models.config import ModelConfig

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def qwen3_moe(tmp_path_factory):
  model = hf_models.build('qwen3_moe', seed=3)
  return model, hf_models.save(model, tmp_path_factory.mktemp('qwen3_moe'))


def params_of(model) -> dict:
  return nnx.state(model, nnx.Param).to_pure_dict()


def assert_same_params(actual, expected) -> None:
  jax.tree.map(np.testing.assert_array_equal, params_of(actual), params_of(expected))


def copy_checkpoint(source: pathlib.Path, destination: pathlib.Path) -> pathlib.Path:
  destination.mkdir(parents=True)
  for path in source.iterdir():
    (destination / path.name).write_bytes(path.read_bytes())
  return destination


def to_4x_spelling(values: dict) -> None:
  """transformers 4.x field names: num_experts and a top-level rope_theta."""
  values['num_experts'] = values.pop('num_local_experts')
  values['rope_theta'] = values.pop('rope_parameters')['rope_theta']


def to_deepseek_spelling(values: dict) -> None:
  values['n_routed_experts'] = values.pop('num_local_experts')


def test_saved_config_uses_5x_spelling(qwen3_moe):
  values = json.loads((qwen3_moe[1] / 'config.json').read_text())
  assert 'num_local_experts' in values  # What transformers 5.x writes for qwen3_moe.
  assert 'rope_theta' in values['rope_parameters']


@pytest.mark.parametrize('edit', [to_4x_spelling, to_deepseek_spelling])
def test_config_spellings_load_identically(qwen3_moe, tmp_path, edit):
  directory = copy_checkpoint(qwen3_moe[1], tmp_path / 'edited')
  hf_models.rewrite_config(directory, edit)
  assert hf.load_config(directory) == hf.load_config(qwen3_moe[1])
  assert hf.load_config(directory).rope_theta == 1e6
  assert hf.load_config(directory).num_experts == 16


def test_config_maps_qwen3_moe_options(qwen3_moe):
  cfg = hf.load_config(qwen3_moe[1])
  assert cfg.moe_layers == (1, 2)  # mlp_only_layers=[0].
  assert cfg.head_dim == 16
  assert cfg.qk_norm == 'head'
  assert not cfg.tie_embeddings
  assert hash(cfg) == hash(hf.load_config(qwen3_moe[1]))


@pytest.mark.parametrize('family', ['deepseek_v2_lite', 'qwen2_moe', 'llama3_rope'])
def test_model_config_json_round_trip(tmp_path, family):
  directory = hf_models.save(hf_models.build(family), tmp_path / family)
  cfg = hf.load_config(directory)
  restored = ModelConfig.from_dict(json.loads(cfg.to_json()))
  assert restored == cfg
  assert hash(restored) == hash(cfg)


@pytest.mark.parametrize('field, value', [('qk_norm', 'per_head'), ('attention', 'mqa'),
                                          ('router_groups', 3), ('router_topk_groups', 5),
                                          ('moe_layer_step', 0), ('clip_qkv', -1.0)])
def test_model_config_rejects_invalid_option(qwen3_moe, field, value):
  values = {**hf.load_config(qwen3_moe[1]).__dict__, field: value}
  if field == 'router_topk_groups':
    values['router_groups'] = 4
  with pytest.raises(ValueError, match=field):
    ModelConfig(**values)


def test_mla_config_needs_latent_sizes(tmp_path):
  directory = hf_models.save(hf_models.build('deepseek_v2_lite'), tmp_path / 'mla')
  values = {**hf.load_config(directory).__dict__, 'kv_lora_rank': 0}
  with pytest.raises(ValueError, match="kv_lora_rank must be positive with attention='mla'"):
    ModelConfig(**values)


def test_max_seq_len_caps_kv_cache(qwen3_moe):
  assert hf.load_config(qwen3_moe[1], max_seq_len=64).max_seq_len == 64
  assert hf.load_config(qwen3_moe[1], max_seq_len=4096).max_seq_len == hf_models.MAX_POSITIONS


@pytest.mark.parametrize('family', ['qwen3_moe', 'mixtral', 'qwen2_moe'])
def test_fused_expert_layout_loads_identically(tmp_path, family):
  model = hf_models.build(family, seed=4)
  per_expert = hf.load(hf_models.save(model, tmp_path / 'per_expert'), experts_on_host=False)
  fused_dir = hf_models.save_fused(model, tmp_path / 'fused')
  assert any('gate_up_proj' in name for name in load_file(fused_dir / 'model.safetensors'))
  assert_same_params(hf.load(fused_dir, experts_on_host=False), per_expert)


def test_mixtral_hub_names_load(tmp_path):
  # Hub Mixtral checkpoints name the block `block_sparse_moe` and the experts w1, w2, w3.
  model = hf_models.build('mixtral', seed=5)
  directory = hf_models.save(model, tmp_path / 'saved')
  tensors = load_file(directory / 'model.safetensors')
  renames = {'.mlp.gate.': '.block_sparse_moe.gate.', '.gate_proj.': '.w1.',
             '.down_proj.': '.w2.', '.up_proj.': '.w3.'}
  hub = {}
  for name, tensor in tensors.items():
    if '.mlp.' in name:
      name = name.replace('.mlp.', '.block_sparse_moe.')
      for old, new in renames.items():
        name = name.replace(old, new)
    hub[name] = tensor
  assert any('block_sparse_moe.experts.0.w1.weight' in name for name in hub)
  save_file(hub, directory / 'model.safetensors')
  expected = hf.load(hf_models.save(model, tmp_path / 'reference'), experts_on_host=False)
  assert_same_params(hf.load(directory, experts_on_host=False), expected)


def test_sharded_checkpoint_loads_identically(qwen3_moe, tmp_path):
  model, directory = qwen3_moe
  model.save_pretrained(tmp_path / 'sharded', max_shard_size='40KB')
  assert (tmp_path / 'sharded' / hf.INDEX_FILE).is_file()
  assert len(list((tmp_path / 'sharded').glob('*.safetensors'))) > 2
  assert_same_params(hf.load(tmp_path / 'sharded'), hf.load(directory))


def test_experts_placed_in_pinned_host(qwen3_moe):
  model = hf.load(qwen3_moe[1])
  moe_layer = model.layers[1]
  assert moe_layer.ffn.gate[...].sharding.memory_kind == 'pinned_host'
  assert moe_layer.ffn.router.kernel[...].sharding.memory_kind == 'device'
  assert model.layers[0].ffn.gate_proj.kernel[...].sharding.memory_kind == 'device'


def test_bf16_checkpoint_loads_in_both_dtypes(qwen3_moe, tmp_path):
  model, _ = qwen3_moe
  directory = tmp_path / 'bf16'
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(directory)  # The fixture stays fp32.
  tokens = [5, 17, 33, 2, 90, 41]
  expected = hf_models.logits_hf(model, tokens)
  for dtype, tolerance in (('bfloat16', 0.1), ('float32', 0.05)):
    loaded = hf.load(directory, dtype=dtype, experts_on_host=False)
    assert loaded.layers[1].ffn.gate[...].dtype == jnp.dtype(dtype)
    logits, _ = loaded.decode(jnp.asarray([tokens]), loaded.init_caches(), jnp.int32(0))
    error = np.abs(np.asarray(logits[0]) - expected).max() / np.abs(expected).max()
    assert error < tolerance, dtype


def test_invalid_dtype_is_named(qwen3_moe):
  with pytest.raises(ValueError, match="dtype='int8' is invalid"):
    hf.load(qwen3_moe[1], dtype='int8')


# Errors: each names the field, tensor or file and what to do.


def drop_tensor(directory: pathlib.Path, name: str) -> None:
  tensors = load_file(directory / 'model.safetensors')
  del tensors[name]
  save_file(tensors, directory / 'model.safetensors')


def add_tensor(directory: pathlib.Path, name: str) -> None:
  tensors = load_file(directory / 'model.safetensors')
  tensors[name] = np.ones(4, np.float32)
  save_file(tensors, directory / 'model.safetensors')


def truncate(directory: pathlib.Path) -> None:
  path = directory / 'model.safetensors'
  path.write_bytes(path.read_bytes()[:-1000])


def corrupt_header(directory: pathlib.Path) -> None:
  path = directory / 'model.safetensors'
  path.write_bytes(b'\xff' * 16 + path.read_bytes()[16:])


def set_field(name, value):
  return lambda directory: hf_models.rewrite_config(directory,
                                                    lambda values: values.update({name: value}))


def remove_field(name):
  return lambda directory: hf_models.rewrite_config(directory, lambda values: values.pop(name))


@pytest.mark.parametrize('damage, message', [
    (lambda d: drop_tensor(d, 'model.layers.1.mlp.experts.3.up_proj.weight'),
     r'Tensor model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight not found'),
    (lambda d: drop_tensor(d, 'model.layers.0.self_attn.k_norm.weight'),
     r'Tensor model\.layers\.0\.self_attn\.k_norm\.weight not found'),
    (set_field('moe_intermediate_size', 24),
     r'Tensor model\.layers\.1\.mlp\.experts\.0\.down_proj\.weight in .*model\.safetensors has '
     r'shape \(32, 16\), but config\.json implies \(32, 24\)'),
    (set_field('vocab_size', 100), r'model\.embed_tokens\.weight .* has shape \(96, 32\)'),
    (set_field('model_type', 'gpt2'), r"model_type='gpt2' is not supported"),
    (set_field('use_sliding_window', True), r'use_sliding_window=True is not supported'),
    (set_field('hidden_act', 'gelu'), r"hidden_act='gelu' is not supported"),
    (set_field('rope_parameters', {'rope_type': 'dynamic', 'rope_theta': 1e6, 'factor': 4.0}),
     r"rope_type='dynamic', which is not supported"),
    (set_field('rope_parameters', {'rope_type': 'yarn', 'rope_theta': 1e6, 'factor': 4.0}),
     r"lacks the parameter 'original_max_position_embeddings'"),
    (remove_field('num_hidden_layers'), r'has no field num_hidden_layers'),
    (lambda d: add_tensor(d, 'model.layers.0.self_attn.q_proj.bias'),
     r"tensors spac_jax does not use, e\.g\. \['model\.layers\.0\.self_attn\.q_proj\.bias'\]"),
    (truncate, r'Cannot read safetensors file .*model\.safetensors: .*truncated or corrupt'),
    (corrupt_header, r'Cannot read safetensors file .*model\.safetensors'),
    (lambda d: (d / 'config.json').write_text('{"model_type": '), r'config\.json is not valid'),
])
def test_bad_checkpoint_is_named(qwen3_moe, tmp_path, damage, message):
  directory = copy_checkpoint(qwen3_moe[1], tmp_path / 'damaged')
  damage(directory)
  with pytest.raises(ValueError, match=message):
    hf.load(directory)


@pytest.mark.parametrize('family, field, value, message', [
    ('mixtral', 'sliding_window', 64, 'sliding_window=64 is not supported'),
    ('deepseek_v2', 'topk_method', 'noaux_tc', "topk_method='noaux_tc' is not supported"),
    ('deepseek_v2', 'scoring_func', 'sigmoid', "scoring_func='sigmoid' is not supported"),
])
def test_unsupported_family_option_is_named(tmp_path, family, field, value, message):
  directory = hf_models.save(hf_models.build(family), tmp_path / family)
  hf_models.rewrite_config(directory, lambda values: values.update({field: value}))
  with pytest.raises(ValueError, match=message):
    hf.load_config(directory)


def test_missing_weights_file_is_named(qwen3_moe, tmp_path):
  directory = copy_checkpoint(qwen3_moe[1], tmp_path / 'no_weights')
  (directory / 'model.safetensors').unlink()
  with pytest.raises(FileNotFoundError, match='neither model.safetensors nor'):
    hf.load(directory)


def test_missing_shard_is_named(qwen3_moe, tmp_path):
  qwen3_moe[0].save_pretrained(tmp_path / 'sharded', max_shard_size='40KB')
  shard = sorted((tmp_path / 'sharded').glob('*.safetensors'))[-1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=f'Shard {shard.name} listed in'):
    hf.load(tmp_path / 'sharded')


def test_token_ids_prefer_generation_config(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'bos_token_id': 5, 'eos_token_id': 6}))
  assert hf_config.token_ids(tmp_path) == {'bos': [5], 'eos': [6], 'pad': []}
  (tmp_path / 'generation_config.json').write_text(json.dumps({'eos_token_id': [7, 8]}))
  assert hf_config.token_ids(tmp_path) == {'bos': [5], 'eos': [7, 8], 'pad': []}


_PEAK_RSS_SCRIPT = '''
import pathlib, sys
import jax, jax.numpy as jnp
from spac_jax.models import hf

def status(field):
  for line in open('/proc/self/status'):
    if line.startswith(field):
      return int(line.split()[1]) * 1024

jnp.zeros(1).block_until_ready()  # Start the backend before the baseline.
baseline = status('VmRSS')
model = hf.load(sys.argv[1], dtype='bfloat16')
size = sum(p.stat().st_size for p in pathlib.Path(sys.argv[1]).glob('*.safetensors'))
print((status('VmHWM') - baseline) / size)
'''


def test_peak_memory_while_loading_bf16(tmp_path):
  # About 300 MB of bf16 weights: 8 MoE layers of 48 experts of 3 x 512 x 256.
  import transformers  # pylint: disable=import-outside-toplevel

  config = hf_models.hf_config('qwen3_moe', hidden_size=512, num_hidden_layers=8,
                               num_experts=48, moe_intermediate_size=256,
                               intermediate_size=512, mlp_only_layers=[], vocab_size=4096)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
  model.save_pretrained(tmp_path / 'wide')
  del model
  size = sum(p.stat().st_size for p in (tmp_path / 'wide').glob('*.safetensors'))
  assert size > 250 * 2**20

  result = subprocess.run([sys.executable, '-c', _PEAK_RSS_SCRIPT, str(tmp_path / 'wide')],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  ratio = float(result.stdout.strip().splitlines()[-1])
  print(f'peak RSS growth while loading / checkpoint size = {ratio:.3f}')
  assert ratio < 1.2
