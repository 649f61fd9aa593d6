"""One experiment: load the target and draft, generate for every prompt, write the results.

Files written into the workdir:
  config.json        the resolved config
  generations.jsonl  one line per prompt, flushed as the prompt finishes
  results.json       summary figures (see `summarize`)
"""

import collections
import json
import pathlib
import time

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from spac_jax import loading, validation
from spac_jax.data.prompts import Prompt, load_prompts
from spac_jax.data.hf_tokenizer import HFTokenizer
from spac_jax.data.tokenizer import ByteTokenizer
from spac_jax.decoding.draft import DeviceModel
from spac_jax.decoding.generate import Generation, Generator
from spac_jax.decoding.target import OffloadedTarget
from spac_jax.offload import memory
from spac_jax.policies import PolicyOptions


class CompileTimer:
  """Context manager summing XLA backend compilations reported through jax.monitoring."""

  EVENT = '/jax/core/compile/backend_compile_duration'

  def __init__(self):
    self.seconds = 0.0
    self.count = 0

  def __enter__(self) -> 'CompileTimer':
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    return self

  def __exit__(self, *exc_info) -> None:
    jax.monitoring.unregister_event_duration_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event == self.EVENT:
      self.seconds += duration
      self.count += 1


def prepare_prompt(prompt: Prompt, tokenizer: ByteTokenizer | HFTokenizer, max_len: int,
                   overlong: str) -> tuple[list[int], bool]:
  """Tokenise a prompt; if it is longer than max_len, keep its end or raise.

  Returns:
    Token ids (BOS first when the tokenizer adds one) and whether they were truncated.
  """
  ids = tokenizer.encode(prompt.text)
  if len(ids) <= max_len:
    return ids, False
  if overlong == 'reject':
    raise ValueError(f'Prompt {prompt.id} has {len(ids)} tokens, more than the {max_len} that '
                     'fit the context with max_new_tokens and draft_len; shorten it, lower '
                     "config.data.max_new_tokens, or set config.data.overlong_prompts='truncate'.")
  if tokenizer.bos_id is not None and ids[0] == tokenizer.bos_id:
    return [tokenizer.bos_id] + ids[len(ids) - max_len + 1:], True
  return ids[len(ids) - max_len:], True


def summarize(generations: list[Generation], target: OffloadedTarget, speculative: bool
              ) -> dict:
  """Headline figures over all prompts.

  tokens_per_second counts every output token over the whole generation time (prefill
  included); time_per_output_token_ms excludes the first token and its prefill.
  """
  output_tokens = sum(len(g.tokens) for g in generations)
  total_s = sum(g.total_time_s for g in generations)
  decode_s = sum(g.total_time_s - g.time_to_first_token_s for g in generations)
  decode_tokens = sum(len(g.tokens) - 1 for g in generations)
  accepted = [length for g in generations for length in g.accepted_lengths]
  proposed = sum(g.proposed_draft_tokens for g in generations)
  results = {
      'num_prompts': len(generations),
      'output_tokens': output_tokens,
      'tokens_per_second': output_tokens / total_s if total_s else 0.0,
      'time_per_output_token_ms': 1e3 * decode_s / decode_tokens if decode_tokens else None,
      'time_to_first_token_ms': 1e3 * float(np.mean([g.time_to_first_token_s
                                                     for g in generations])),
      'mean_accepted_length': float(np.mean(accepted)) if accepted else None,
      'acceptance_rate': (sum(g.accepted_draft_tokens for g in generations) / proposed
                          if speculative and proposed else None),
      'target_passes': len(accepted),
      'stop_reasons': dict(collections.Counter(g.stop_reason for g in generations)),
  }
  results.update(target.stats.summary())
  # The stats count MoE layers only; name the model layer of each (dense layers are skipped).
  for entry, model_layer in zip(results['per_layer'], target.cfg.moe_layers):
    entry['model_layer'] = model_layer
  results['host_to_device_bytes_per_token'] = (results['host_to_device_bytes'] / output_tokens
                                               if output_tokens else 0.0)
  return results


def _generate_all(prompts: list[Prompt], generator: Generator,
                  tokenizer: ByteTokenizer | HFTokenizer,
                  config: ml_collections.ConfigDict, workdir: pathlib.Path
                  ) -> tuple[list[Generation], int, CompileTimer]:
  """Generate for every prompt, appending each to generations.jsonl as it finishes."""
  generations, truncated = [], 0
  with CompileTimer() as compile_timer, open(workdir / 'generations.jsonl', 'w') as out:
    for prompt in tqdm.tqdm(prompts, desc='prompts', unit='prompt'):
      ids, was_truncated = prepare_prompt(prompt, tokenizer, generator.max_prompt_len(),
                                          config.data.overlong_prompts)
      if was_truncated:
        truncated += 1
        logging.warning('Prompt %s truncated to its last %d tokens.', prompt.id, len(ids))
      generation = generator.generate(ids)
      generations.append(generation)
      record = {'id': prompt.id, 'prompt': prompt.text,
                'output': tokenizer.decode(generation.tokens), 'output_ids': generation.tokens,
                'accepted_lengths': generation.accepted_lengths,
                'prompt_tokens': len(ids), 'truncated': was_truncated,
                'stop_reason': generation.stop_reason}
      out.write(json.dumps(record) + '\n')
      out.flush()
  return generations, truncated, compile_timer


OUTPUT_FILES = ('config.json', 'generations.jsonl', 'results.json')


def _prepare_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Create the workdir, drop a previous run's outputs, and write the resolved config.

  Called only once the models and prompts have loaded, so a run that fails earlier leaves a
  previous run's outputs untouched, and one that fails later never mixes with them.
  """
  workdir.mkdir(parents=True, exist_ok=True)
  stale = [name for name in OUTPUT_FILES if (workdir / name).exists()]
  if stale:
    logging.warning('Replacing the previous run in %s (%s).', workdir, ', '.join(stale))
    for name in stale:
      (workdir / name).unlink()
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2) + '\n')


def _rounded(value: float | None) -> str:
  return 'n/a' if value is None else f'{value:.2f}'


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Run the experiment `config` and write its outputs into `workdir`; return results."""
  validation.validate(config)
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise validation.ConfigError(f'--workdir={workdir} is a file; give a directory.')
  device = memory.default_device()
  logging.info('jax %s, device %s, memory kinds %s', jax.__version__, device,
               sorted(m.kind for m in device.addressable_memories()))

  tokenizer = loading.load_tokenizer(config)
  speculative = config.decode.mode == 'speculative'
  target_model = loading.load_target(config)
  if not target_model.cfg.is_moe:
    raise validation.ConfigError(
        f'config.model.path={config.model.path!r} is a dense model without routed experts; '
        'the target must be an MoE checkpoint (a dense model can be the draft).')
  counts = target_model.cfg.param_counts()
  num_moe_layers = len(target_model.cfg.moe_layers)
  logging.info('Target %s: %d parameters, %d active per token, %d of %d layers MoE x %d '
               'experts (top-%d).', config.model.path, counts['total'], counts['active'],
               num_moe_layers, target_model.cfg.num_layers, target_model.cfg.num_experts,
               target_model.cfg.top_k)
  total_experts = num_moe_layers * target_model.cfg.num_experts
  requested_slots = int(round(config.offload.cache_ratio * total_experts))
  draft = None
  if speculative:
    draft_model = loading.load_draft(config, target_model)
    logging.info('Draft %s: %d parameters.', config.draft.path,
                 draft_model.cfg.param_counts()['total'])
    draft = DeviceModel(draft_model)

  prompts = load_prompts(config.data.source, config.data.num_prompts, config.data.path or None)
  max_seq_len = min(target_model.cfg.max_seq_len,
                    draft.cfg.max_seq_len if draft else target_model.cfg.max_seq_len)

  options = PolicyOptions(next_window=config.decode.draft_len + 1 if speculative else 1,
                          spac=config.spac)

  def make_target() -> OffloadedTarget:
    return OffloadedTarget(target_model, config.offload.policy, requested_slots, options)

  def make_generator(target: OffloadedTarget | None, stop_at_eos: bool = True) -> Generator:
    # The warm-up ignores EOS (-1 matches no token), so a first prompt that ends at once
    # still compiles the decoding programs.
    return Generator(target, max_seq_len, tokenizer.eos_id if stop_at_eos else -1,
                     tokenizer.pad_id, config.data.max_new_tokens, draft,
                     config.decode.draft_len if speculative else 0,
                     extra_eos_ids=(tuple(getattr(tokenizer, 'eos_ids', ())[1:])
                                    if stop_at_eos else ()))

  # Warm-up on the first prompt compiles the common programs. The measured run then uses a
  # fresh target, with an empty cache and zero counters but the same compiled programs.
  max_prompt_len = make_generator(None).max_prompt_len()
  if max_prompt_len < 2:
    raise validation.ConfigError(
        f'config.data.max_new_tokens={config.data.max_new_tokens} plus config.decode.draft_len='
        f'{config.decode.draft_len} plus one verified token leave no room for a prompt in the '
        f'{max_seq_len}-token context of the models; lower max_new_tokens or draft_len.')
  if config.data.overlong_prompts == 'reject':
    for prompt in prompts:  # Reject before any work rather than midway through the run.
      prepare_prompt(prompt, tokenizer, max_prompt_len, 'reject')
  _prepare_workdir(workdir, config)

  warmup_started = time.perf_counter()
  warmup_target = make_target()
  generator = make_generator(warmup_target, stop_at_eos=False)
  try:
    generator.generate(prepare_prompt(prompts[0], tokenizer, generator.max_prompt_len(),
                                      'truncate')[0])
  finally:
    warmup_target.policy.close()
  warmup_s = time.perf_counter() - warmup_started

  target = make_target()
  generator = make_generator(target)
  logging.info('Policy %s, %d of %d experts fit the device cache (%.1f MiB); mode %s, '
               'draft_len %d; context %d tokens (prompts up to %d); %d prompts from %s; '
               'warm-up %.1f s.', config.offload.policy, target.cache.num_slots,
               total_experts, target.cache.num_slots * target.store.bytes_per_expert / 2**20,
               config.decode.mode, generator.draft_len, max_seq_len, max_prompt_len,
               len(prompts), config.data.source, warmup_s)

  try:
    generations, truncated, compile_timer = _generate_all(prompts, generator, tokenizer,
                                                          config, workdir)
  finally:
    target.policy.close()

  results = summarize(generations, target, speculative)
  results.update(target.policy.results())
  results.update({'policy': config.offload.policy, 'mode': config.decode.mode,
                  'draft_len': generator.draft_len, 'cache_slots': target.cache.num_slots,
                  'total_experts': total_experts, 'truncated_prompts': truncated,
                  'warmup_s': warmup_s, 'compile_s_during_run': compile_timer.seconds,
                  'compiles_during_run': compile_timer.count, 'device': str(device)})
  (workdir / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
  logging.info('Done: %d tokens, %.1f tokens/s, TPOT %s ms, accepted length %s, hit rate '
               '%.3f, CPU expert share %.3f, %.1f MiB host to device. Results in %s.',
               results['output_tokens'], results['tokens_per_second'],
               _rounded(results['time_per_output_token_ms']),
               _rounded(results['mean_accepted_length']),
               results['expert_hit_rate'], results['cpu_expert_fraction'],
               results['host_to_device_bytes'] / 2**20, workdir / 'results.json')
  return results
