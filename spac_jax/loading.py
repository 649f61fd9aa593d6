"""Checkpoint and tokenizer loading for an experiment, for both checkpoint formats.

  orbax  a directory written by spac_jax.train (model_config.json plus params/), used with the
         byte-level tokenizer of the embedded models.
  hf     a Hugging Face directory (config.json plus safetensors), used with its tokenizer.json.
`config.model.format` = 'auto' (the default) picks 'hf' when the directory has config.json
and safetensors weights, else 'orbax'. Config fields this module reads beyond
configs/default.py's (`model.format`, `model.dtype`, `model.max_seq_len`, `draft.format`,
`data.chat_template`) fall back to their defaults when a config file lacks them. `model.dtype`
and `model.max_seq_len` apply to 'hf' checkpoints only; an orbax checkpoint keeps the dtype
and length it was saved with.
"""

import pathlib

import ml_collections
import tokenizers

from spac_jax.data.hf_tokenizer import HFTokenizer
from spac_jax.data.tokenizer import ByteTokenizer
from spac_jax.decoding.target import expert_sharding_fn
from spac_jax.models import checkpoint, hf
from spac_jax.models.transformer import Transformer
from spac_jax.validation import FORMATS, ConfigError


def checkpoint_format(section: ml_collections.ConfigDict) -> str:
  """Return the format of the checkpoint in `section.path`: 'orbax' or 'hf'."""
  requested = section.get('format', 'auto')
  if requested not in FORMATS:
    raise ConfigError(f'format={requested!r} is invalid; choose one of {list(FORMATS)}.')
  if requested != 'auto':
    return requested
  return 'hf' if hf.is_hf_checkpoint(section.path) else 'orbax'


def _max_seq_len(model: ml_collections.ConfigDict) -> int | None:
  return model.get('max_seq_len', 0) or None


def load_target(config: ml_collections.ConfigDict) -> Transformer:
  """Load the target with its routed experts in pinned_host memory."""
  model = config.model
  if checkpoint_format(model) == 'hf':
    return hf.load(model.path, model.get('dtype', 'float32'), experts_on_host=True,
                   max_seq_len=_max_seq_len(model))
  return checkpoint.load(model.path, expert_sharding_fn)


def load_draft(config: ml_collections.ConfigDict, target: Transformer) -> Transformer:
  """Load the draft whole on the device; its vocabulary must be the target's."""
  draft_format = checkpoint_format(config.draft)
  if draft_format == 'hf':
    draft = hf.load(config.draft.path, config.model.get('dtype', 'float32'),
                    experts_on_host=False, max_seq_len=_max_seq_len(config.model))
  else:
    draft = checkpoint.load(config.draft.path)
  check_draft_vocabulary(target, draft, config.model.path, config.draft.path)
  if draft_format == 'hf' and checkpoint_format(config.model) == 'hf':
    check_draft_tokenizer(config.model.path, config.draft.path)
  return draft


def check_draft_vocabulary(target: Transformer, draft: Transformer, target_path: str,
                           draft_path: str) -> None:
  """Raise ConfigError when the draft's vocabulary size differs from the target's."""
  if draft.cfg.vocab_size != target.cfg.vocab_size:
    raise ConfigError(
        f'Draft {draft_path} has a vocabulary of {draft.cfg.vocab_size} tokens but the target '
        f'{target_path} has {target.cfg.vocab_size}; speculative decoding needs a draft with '
        'the same tokenizer as the target.')


def check_draft_tokenizer(target_path: str, draft_path: str) -> None:
  """Raise ConfigError when both tokenizer.json files exist and map tokens differently."""
  files = [pathlib.Path(path) / 'tokenizer.json' for path in (target_path, draft_path)]
  if not all(file.is_file() for file in files):
    return
  vocabularies = []
  for file in files:
    try:
      vocabularies.append(tokenizers.Tokenizer.from_file(str(file)).get_vocab())
    except Exception as error:  # tokenizers raises a bare Exception for invalid files.
      raise ConfigError(f'Cannot read tokenizer {file}: {error}.') from error
  target_vocab, draft_vocab = vocabularies
  if target_vocab != draft_vocab:
    raise ConfigError(f'The draft tokenizer {files[1]} maps tokens differently from the target '
                      f'tokenizer {files[0]}; speculative decoding needs the same tokenizer.')


def load_tokenizer(config: ml_collections.ConfigDict) -> ByteTokenizer | HFTokenizer:
  """Load the target's tokenizer: its tokenizer.json for 'hf', else the byte tokenizer."""
  chat_template = config.data.get('chat_template', '')
  if checkpoint_format(config.model) == 'hf':
    return HFTokenizer(pathlib.Path(config.model.path), chat_template)
  if chat_template:
    raise ConfigError(f'config.data.chat_template={chat_template!r} needs a Hugging Face '
                      "checkpoint with a chat template; the byte tokenizer has none, so set it "
                      "to ''.")
  return ByteTokenizer()
