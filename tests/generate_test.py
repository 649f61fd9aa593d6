"""Generation loops against scripted models whose caches are checked position by position."""

import numpy as np
import pytest

from spac_jax.decoding.generate import Generator, prefill_bucket

EOS, PAD, MAX_LEN = 257, 258, 256


class ScriptedModel:
  """A model whose next token is a hash of every cached token up to the query position.

  It keeps its own cache of tokens by position, exactly like a KV cache: a generation loop
  that fails to roll back, or feeds a token at the wrong position, changes later
  predictions, so its output diverges from autoregressive decoding.
  """

  def __init__(self, salt: int, agree_every: int = 0):
    self.salt = salt
    self.agree_every = agree_every  # Draft only: deviate from the target on some positions.
    self.cache = np.full(MAX_LEN, -1, np.int64)
    self.calls = []

  def predict(self, position: int) -> int:
    prefix = self.cache[:position + 1]
    value = int((prefix * np.arange(1, position + 2)).sum() % 251)
    if self.agree_every and position % self.agree_every == 0:
      value = (value + self.salt) % 251
    return value

  def forward(self, tokens, start, num_valid):
    assert start + len(tokens) <= MAX_LEN
    self.calls.append(len(tokens))
    self.cache[start:start + len(tokens)] = tokens
    return np.asarray([self.predict(start + i) for i in range(num_valid)])


def generate(draft_len, agree_every, max_new_tokens=40, prompt=(256, 1, 2, 3)):
  target = ScriptedModel(salt=0)
  draft = ScriptedModel(salt=7, agree_every=agree_every) if draft_len else None
  generator = Generator(target, MAX_LEN, EOS, PAD, max_new_tokens, draft, draft_len)
  return generator.generate(list(prompt)), target


@pytest.mark.parametrize('draft_len', [1, 2, 4, 7])
@pytest.mark.parametrize('agree_every', [0, 2, 3, 5])
def test_speculative_equals_autoregressive(draft_len, agree_every):
  reference, _ = generate(0, 0)
  result, target = generate(draft_len, agree_every)
  assert result.tokens == reference.tokens
  assert sum(result.accepted_lengths) == len(result.tokens) - 1 or (
      result.stop_reason == 'max_new_tokens')
  assert all(1 <= length <= draft_len + 1 for length in result.accepted_lengths)
  assert set(target.calls[1:]) == {draft_len + 1}  # Verification windows only.


def test_perfect_draft_accepts_everything():
  result, _ = generate(draft_len=4, agree_every=0, max_new_tokens=21)
  assert result.accepted_lengths == [5, 5, 5, 5]
  assert result.accepted_draft_tokens == result.proposed_draft_tokens == 16


def test_draft_wrong_at_every_position_accepts_nothing():
  result, _ = generate(draft_len=3, agree_every=1, max_new_tokens=9)
  assert result.accepted_lengths == [1] * 8
  assert result.accepted_draft_tokens == 0
  assert result.proposed_draft_tokens == 24


def test_stops_at_eos():
  class EosModel(ScriptedModel):
    def predict(self, position):
      return EOS if position == 9 else 5

  generator = Generator(EosModel(0), MAX_LEN, EOS, PAD, 50, EosModel(0), 3)
  result = generator.generate([256, 1, 2, 3])
  assert result.tokens == [5] * 6 + [EOS]
  assert result.stop_reason == 'eos'


def test_longest_prompt_never_passes_context_end():
  generator = Generator(ScriptedModel(0), MAX_LEN, EOS, PAD, 24, ScriptedModel(3, 2), 4)
  # ScriptedModel.forward asserts that every window ends inside MAX_LEN.
  result = generator.generate([256] + [1] * (generator.max_prompt_len() - 1))
  assert result.stop_reason == 'max_new_tokens'
  assert len(result.tokens) == 24


def test_prompt_longer_than_room_is_rejected():
  generator = Generator(ScriptedModel(0), 64, EOS, PAD, 32, ScriptedModel(1), 4)
  with pytest.raises(ValueError, match='outside'):
    generator.generate([1] * 28)


def test_negative_draft_len_is_rejected():
  with pytest.raises(ValueError, match='draft_len'):
    Generator(ScriptedModel(0), 64, EOS, PAD, 8, ScriptedModel(1), -1)


@pytest.mark.parametrize('length, expected', [(1, 16), (16, 16), (17, 32), (300, 512),
                                              (900, 1000)])
def test_prefill_bucket(length, expected):
  assert prefill_bucket(length, 1000) == expected
