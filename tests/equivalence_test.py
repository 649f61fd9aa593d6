"""The method's invariant: output tokens never depend on residency, policy or decoding mode.

Reference: the same checkpoint run whole on the device, MoE layers computing every expert
densely (`Transformer.decode`), a separate code path from the offloaded engine.
"""

import pytest

from spac_jax.decoding.draft import DeviceModel
from spac_jax.decoding.generate import Generator
from spac_jax.decoding.target import OffloadedTarget, expert_sharding_fn
from spac_jax.models import checkpoint

PROMPT = [256] + list(b'def add(a, b):\n    return')
NEW_TOKENS = 24
EOS, PAD = 257, 258
TOTAL_EXPERTS = 16  # 2 layers x 8 experts in the tiny target.


@pytest.fixture(scope='module')
def models(tiny_checkpoints):
  target = checkpoint.load(tiny_checkpoints['target'], expert_sharding_fn)
  return {
      'target': target,
      'reference': DeviceModel(checkpoint.load(tiny_checkpoints['target'])),
      'draft': DeviceModel(checkpoint.load(tiny_checkpoints['draft'])),
  }


def generate(target, draft=None, draft_len=0):
  generator = Generator(target, 128, EOS, PAD, NEW_TOKENS, draft, draft_len)
  return generator.generate(PROMPT)


@pytest.fixture(scope='module')
def reference_tokens(models):
  return generate(models['reference']).tokens


@pytest.mark.parametrize('policy', ['all_on_device', 'on_demand', 'lru', 'spac'])
@pytest.mark.parametrize('slots', [0, 3, TOTAL_EXPERTS])
def test_offloaded_autoregressive_matches_reference(models, reference_tokens, policy, slots):
  target = OffloadedTarget(models['target'], policy, slots)
  assert generate(target).tokens == reference_tokens


@pytest.mark.parametrize('policy', ['all_on_device', 'on_demand', 'lru', 'spac'])
@pytest.mark.parametrize('slots', [0, 5, TOTAL_EXPERTS])
@pytest.mark.parametrize('draft_name', ['draft', 'reference'])
def test_offloaded_speculative_matches_reference(models, reference_tokens, policy, slots,
                                                 draft_name):
  # The 'reference' draft agrees with the target on every token, exercising full acceptance
  # and the draft's catch-up window; the random draft exercises rejection and rollback.
  target = OffloadedTarget(models['target'], policy, slots)
  result = generate(target, models[draft_name], draft_len=4)
  assert result.tokens == reference_tokens
  if draft_name == 'reference':
    assert result.accepted_draft_tokens >= result.proposed_draft_tokens - 4


def test_lru_counters_add_up(models):
  target = OffloadedTarget(models['target'], 'lru', 3)
  generate(target, models['draft'], draft_len=3)
  stats = target.stats
  assert (stats.hits + stats.misses == stats.device_experts + stats.cpu_experts).all()
  assert (stats.misses == stats.cpu_experts).all()  # LRU computes every miss on the CPU.
  assert stats.host_to_device_bytes.sum() == target.cache.bytes_written
  assert stats.hits.sum() > 0


@pytest.mark.parametrize('cost_model', ['profile', 'measure'])
def test_spac_prefetches_and_reports(models, cost_model):
  from configs import default  # pylint: disable=import-outside-toplevel
  from spac_jax.policies import PolicyOptions  # pylint: disable=import-outside-toplevel

  spac = default.get_config().spac
  spac.cost_model = cost_model
  target = OffloadedTarget(models['target'], 'spac', 6, PolicyOptions(next_window=4, spac=spac))
  try:
    generate(target, models['draft'], draft_len=3)
  finally:
    target.policy.close()
  results = target.policy.results()
  assert results['cost_model']['source'] == ('measured' if cost_model == 'measure' else 'profile')
  assert results['solver_time_ms']['mean'] > 0
  assert sum(results['solver_calls'].values()) == len(target.policy.solve_times_ms)
  assert results['prefetches'] <= target.cache.bytes_written // target.store.bytes_per_expert
  assert len(results['per_layer_threshold_last']) == 2
  assert target.stats.host_to_device_bytes.sum() == target.cache.bytes_written
  assert (target.stats.misses == target.stats.cpu_experts).all()  # No critical-path fetch.


def test_spac_decodes_on_when_solver_fails(models, reference_tokens):
  from spac_jax.scheduling.balancer import WorkloadBalancer  # pylint: disable=import-outside-toplevel

  def failing_highs():
    raise RuntimeError('solver unavailable')

  target = OffloadedTarget(models['target'], 'spac', 6)
  policy = target.policy
  policy.balancer = WorkloadBalancer(policy.cost, policy.estimator.config.levels,
                                     highs_factory=failing_highs)
  try:
    result = generate(target, models['draft'], draft_len=4)
  finally:
    policy.close()
  assert result.tokens == reference_tokens
  assert set(policy.results()['solver_calls']) == {'greedy'}
  assert policy.results()['prefetches'] > 0
