"""Parity with `transformers` on tiny random checkpoints of every supported family.

Each checkpoint is built with transformers, saved with save_pretrained and loaded by
spac_jax. Checks: float32 logits of a prompt against transformers' forward, and greedy
tokens against transformers' generate, for the dense reference (every expert on the device,
`Transformer.decode`) and for the offloaded target under three cache policies.
"""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import hf_models
from spac_jax.decoding.draft import DeviceModel
from spac_jax.decoding.generate import Generator
from spac_jax.decoding.target import OffloadedTarget
from spac_jax.models import hf, hf_config, rope

MOE_FAMILIES = ['qwen3_moe', 'mixtral', 'qwen2_moe', 'olmoe', 'deepseek_v2', 'deepseek_v2_lite']
DENSE_FAMILIES = ['qwen3', 'llama', 'qwen2', 'llama3_rope', 'qwen3_yarn']
NEW_TOKENS = 32
NO_EOS, PAD = -1, 0
PROMPT = [int(t) for t in np.random.default_rng(7).integers(3, hf_models.VOCAB, 9)]
CACHE_RATIO = 0.25  # Cache slots per routed expert: some needed experts hit, most miss.


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """Per family: (transformers model, saved directory), built on first use."""
  built = {}

  def get(family: str):
    if family not in built:
      # A seed per family, so a test's weights do not depend on which tests ran before it.
      model = hf_models.build(family, seed=sorted(hf_models.FAMILY_CONFIGS).index(family) + 1)
      built[family] = (model, hf_models.save(model, tmp_path_factory.mktemp(family)))
    return built[family]

  return get


def small_cache(cfg) -> int:
  return round(CACHE_RATIO * len(cfg.moe_layers) * cfg.num_experts)


def generate(target, draft=None, draft_len: int = 0) -> list[int]:
  generator = Generator(target, hf_models.MAX_POSITIONS, NO_EOS, PAD, NEW_TOKENS, draft,
                        draft_len)
  return generator.generate(PROMPT).tokens


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize('family', MOE_FAMILIES + DENSE_FAMILIES)
def test_logits_match_transformers(checkpoint, family):
  model, directory = checkpoint(family)
  loaded = hf.load(directory, experts_on_host=False)
  logits, _ = loaded.decode(jnp.asarray([PROMPT]), loaded.init_caches(), jnp.int32(0))
  expected = hf_models.logits_hf(model, PROMPT)
  assert relative_error(np.asarray(logits[0]), expected) < 1e-4


@pytest.mark.parametrize('family', DENSE_FAMILIES)
def test_dense_greedy_matches_transformers(checkpoint, family):
  model, directory = checkpoint(family)
  expected = hf_models.greedy_hf(model, PROMPT, NEW_TOKENS)
  assert generate(DeviceModel(hf.load(directory))) == expected


@pytest.mark.parametrize('family', MOE_FAMILIES)
def test_moe_greedy_matches_transformers(checkpoint, family):
  model, directory = checkpoint(family)
  expected = hf_models.greedy_hf(model, PROMPT, NEW_TOKENS)
  assert len(set(expected)) > 3  # The tokens vary, so the comparison has power.

  reference = DeviceModel(hf.load(directory, experts_on_host=False))
  assert generate(reference) == expected, 'dense reference'
  offloaded = hf.load(directory)
  for policy in ('all_on_device', 'lru', 'spac'):
    target = OffloadedTarget(offloaded, policy, small_cache(offloaded.cfg))
    try:
      assert generate(target) == expected, policy
    finally:
      target.policy.close()
    if policy != 'all_on_device':  # Both kernels ran: some experts hit, some missed.
      assert target.stats.cpu_experts.sum() > 0, policy
      assert target.stats.device_experts.sum() > 0, policy
    assert len(target.stats.hits) == len(offloaded.cfg.moe_layers)


def test_speculative_qwen3_moe_with_qwen3_draft(checkpoint):
  model, target_dir = checkpoint('qwen3_moe')
  _, draft_dir = checkpoint('qwen3')
  expected = hf_models.greedy_hf(model, PROMPT, NEW_TOKENS)
  draft = DeviceModel(hf.load(draft_dir))
  offloaded = hf.load(target_dir)
  for policy in ('lru', 'spac'):
    target = OffloadedTarget(offloaded, policy, small_cache(offloaded.cfg))
    try:
      assert generate(target, draft, draft_len=4) == expected, policy
    finally:
      target.policy.close()


def test_speculative_accepts_with_matching_draft(checkpoint):
  # The target's own dense reference as draft agrees on every token: full acceptance and the
  # draft's catch-up window run on a model with dense-first layers.
  _, directory = checkpoint('qwen2_moe')
  reference = DeviceModel(hf.load(directory, experts_on_host=False))
  offloaded = hf.load(directory)
  target = OffloadedTarget(offloaded, 'lru', small_cache(offloaded.cfg))
  generator = Generator(target, hf_models.MAX_POSITIONS, NO_EOS, PAD, NEW_TOKENS, reference, 4)
  result = generator.generate(PROMPT)
  assert result.tokens == generate(reference)
  assert result.accepted_draft_tokens >= result.proposed_draft_tokens - 4


@pytest.mark.parametrize('family', MOE_FAMILIES + DENSE_FAMILIES)
def test_param_count_matches_transformers(checkpoint, family):
  model, directory = checkpoint(family)
  cfg = hf.load_config(directory)
  assert cfg.param_counts()['total'] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('parameters', [
    dict(rope_type='linear', factor=4.0),
    dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=16),
    dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=32),
    dict(rope_type='yarn', factor=40.0, original_max_position_embeddings=32, beta_fast=32,
         beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
    dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=32,
         attention_factor=1.3),
], ids=lambda parameters: parameters['rope_type'] + str(len(parameters)))
def test_rope_frequencies_match_transformers(parameters):
  config = hf_models.hf_config('llama', head_dim=16,
                               rope_parameters={'rope_theta': 10000.0, **parameters})
  expected, expected_factor = ROPE_INIT_FUNCTIONS[parameters['rope_type']](config)
  cfg = hf_config.to_model_config(config.to_dict(), pathlib.Path('config.json'))
  inv_freq, factor = rope.frequencies(16, 10000.0, cfg.rope_scaling)
  np.testing.assert_allclose(inv_freq, expected.numpy(), rtol=1e-6)
  assert factor == pytest.approx(expected_factor)
