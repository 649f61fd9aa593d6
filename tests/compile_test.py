"""Decoding compiles a bounded set of programs, never one per token."""

import jax
import pytest

from spac_jax.decoding import draft as draft_module
from spac_jax.decoding import target as target_module
from spac_jax.decoding.draft import DeviceModel
from spac_jax.decoding.generate import Generator
from spac_jax.decoding.target import OffloadedTarget, expert_sharding_fn
from spac_jax.experiment import CompileTimer
from spac_jax.models import checkpoint
from spac_jax.offload import experts

PROMPT = [256] + list(b'for i in range(')


@pytest.mark.parametrize('policy', ['all_on_device', 'lru'])
def test_thirty_tokens_compile_bounded_programs(tiny_checkpoints, policy):
  target = OffloadedTarget(checkpoint.load(tiny_checkpoints['target'], expert_sharding_fn),
                           policy, 5)
  draft = DeviceModel(checkpoint.load(tiny_checkpoints['draft']))
  generator = Generator(target, 128, 257, 258, 30, draft, draft_len=4)
  jax.clear_caches()

  with CompileTimer() as first:
    result = generator.generate(PROMPT)
  assert len(result.tokens) == 30

  # Windows: one prefill bucket and the verification window (draft: prefill, 1 and 2).
  assert target_module._attention_and_route._cache_size() == 2
  assert target_module._embed._cache_size() == 2
  assert target_module._greedy._cache_size() == 2
  assert draft_module._decode_greedy._cache_size() <= 3
  # Expert kernels: one program per (window, power-of-two bucket <= 8 experts).
  assert experts.device_experts._cache_size() <= 2 * 4
  assert experts.host_experts._cache_size() <= 2 * 4
  assert first.count <= 40

  if policy == 'all_on_device':
    # Residency is fixed, so repeating the prompt reuses every program.
    with CompileTimer() as second:
      assert generator.generate(PROMPT).tokens == result.tokens
    assert second.count == 0
