"""Greedy autoregressive and speculative generation.

Both loops drive models through one method, `forward(tokens, start, num_valid)`, that runs a
window of tokens at KV-cache position `start` and returns the greedy next token at each valid
position. The caches are preallocated to `max_seq_len`; "rolling back" a cache means moving
the position pointer back: entries past it are masked by the causal mask (key position <=
query position) and overwritten by the next window.

Cache invariant between passes: both caches hold every token of the sequence except the last
one, `pending`, which is the next input.
"""

import dataclasses
import time
from typing import Protocol

import numpy as np


class GreedyModel(Protocol):

  def forward(self, tokens: np.ndarray, start: int, num_valid: int) -> np.ndarray:
    ...


@dataclasses.dataclass
class Generation:
  """Output of one prompt."""

  tokens: list[int]  # Generated token ids, EOS included when generated.
  # Tokens each target decode pass added to the output: the accepted draft tokens plus the
  # target's own token, fewer only where EOS or max_new_tokens cut the last pass.
  accepted_lengths: list[int]
  proposed_draft_tokens: int
  accepted_draft_tokens: int
  time_to_first_token_s: float
  total_time_s: float
  stop_reason: str  # 'eos', 'max_new_tokens' or 'context'.


def prefill_bucket(length: int, max_seq_len: int, minimum: int = 16) -> int:
  """Static prefill window for a prompt: the next power of two, at most max_seq_len."""
  size = minimum
  while size < length:
    size *= 2
  return min(size, max_seq_len)


@dataclasses.dataclass
class Generator:
  """Greedy decoding of a target, optionally with a draft proposing `draft_len` tokens."""

  target: GreedyModel
  max_seq_len: int
  eos_id: int
  pad_id: int
  max_new_tokens: int
  draft: GreedyModel | None = None
  draft_len: int = 0
  extra_eos_ids: tuple[int, ...] = ()  # Further ids that end generation like eos_id.

  def __post_init__(self):
    if self.draft_len < 0:
      raise ValueError(f'draft_len must be >= 0, got {self.draft_len}.')
    if self.max_new_tokens < 1:
      raise ValueError(f'max_new_tokens must be >= 1, got {self.max_new_tokens}.')

  @property
  def speculative(self) -> bool:
    return self.draft is not None

  def max_prompt_len(self) -> int:
    """Return the maximum prompt length that leaves room for max_new_tokens and one window."""
    return self.max_seq_len - self.max_new_tokens - self.draft_len - 1

  def _prefill(self, model: GreedyModel, prompt: list[int]) -> int:
    window = prefill_bucket(len(prompt), self.max_seq_len)
    tokens = np.full(window, self.pad_id, np.int32)
    tokens[:len(prompt)] = prompt
    return int(model.forward(tokens, 0, len(prompt))[-1])

  def generate(self, prompt: list[int]) -> Generation:
    """Generate greedily from `prompt` (token ids, BOS included) until EOS or a limit."""
    if not 0 < len(prompt) <= self.max_prompt_len():
      raise ValueError(f'Prompt of {len(prompt)} tokens is outside [1, {self.max_prompt_len()}] '
                       f'(max_seq_len={self.max_seq_len}, max_new_tokens={self.max_new_tokens},'
                       f' draft_len={self.draft_len}).')
    started = time.perf_counter()
    output = [self._prefill(self.target, prompt)]
    if self.speculative:
      self._prefill(self.draft, prompt)
    first_token_s = time.perf_counter() - started
    result = Generation(output, [], 0, 0, first_token_s, 0.0, '')
    if self.speculative:
      self._speculative_loop(result, len(prompt))
    else:
      self._autoregressive_loop(result, len(prompt))
    result.total_time_s = time.perf_counter() - started
    return result

  def _is_eos(self, token: int) -> bool:
    return token == self.eos_id or token in self.extra_eos_ids

  def _finished(self, result: Generation, position: int, window: int) -> bool:
    if self._is_eos(result.tokens[-1]):
      result.stop_reason = 'eos'
    elif len(result.tokens) >= self.max_new_tokens:
      result.stop_reason = 'max_new_tokens'
    elif position + window > self.max_seq_len:
      result.stop_reason = 'context'
    return bool(result.stop_reason)

  def _append(self, result: Generation, new_tokens: list[int]) -> None:
    """Append tokens, cutting at EOS and at max_new_tokens, and record how many were kept."""
    kept = 0
    for token in new_tokens:
      if len(result.tokens) >= self.max_new_tokens or self._is_eos(result.tokens[-1]):
        break
      result.tokens.append(int(token))
      kept += 1
    result.accepted_lengths.append(kept)

  def _autoregressive_loop(self, result: Generation, position: int) -> None:
    while not self._finished(result, position, 1):
      token = self.target.forward(np.asarray([result.tokens[-1]], np.int32), position, 1)[0]
      position += 1
      self._append(result, [token])

  def _speculative_loop(self, result: Generation, position: int) -> None:
    """Draft `draft_len` tokens, verify them in one target pass, keep the agreeing prefix.

    Steps of one round, with p the pending token at `position`:
      1. The draft feeds p (preceded by a lagging token if its cache is one behind) and then
         its own proposals, producing d_1..d_g.
      2. The target runs [p, d_1..d_g] at `position` and predicts t_0..t_g.
      3. a = length of the longest prefix with d_i == t_{i-1}; the round adds d_1..d_a and
         t_a (so 1 <= accepted length <= g + 1).
      4. Both caches now hold p, d_1..d_a beyond `position`, except the draft when a == g:
         it never fed d_g, so d_g becomes its lagging token.
    """
    gamma = self.draft_len
    lagging: int | None = None
    while not self._finished(result, position, gamma + 1):
      pending = result.tokens[-1]
      proposals = self._draft_proposals(pending, lagging, position, gamma)
      window = np.asarray([pending] + proposals, np.int32)
      verified = self.target.forward(window, position, gamma + 1)

      accepted = 0
      while accepted < gamma and proposals[accepted] == verified[accepted]:
        accepted += 1
      result.proposed_draft_tokens += gamma
      result.accepted_draft_tokens += accepted
      self._append(result, proposals[:accepted] + [int(verified[accepted])])

      lagging = proposals[-1] if gamma and accepted == gamma else None
      position += accepted + 1

  def _draft_proposals(self, pending: int, lagging: int | None, position: int,
                       gamma: int) -> list[int]:
    if gamma == 0:
      return []
    if lagging is None:
      token = int(self.draft.forward(np.asarray([pending], np.int32), position, 1)[0])
    else:
      window = np.asarray([lagging, pending], np.int32)
      token = int(self.draft.forward(window, position - 1, 2)[-1])
    proposals = [token]
    for step in range(1, gamma):
      token = int(self.draft.forward(np.asarray([token], np.int32), position + step, 1)[0])
      proposals.append(token)
    return proposals
