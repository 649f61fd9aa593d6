"""Tokenizer of a Hugging Face checkpoint: `tokenizer.json` through the `tokenizers` library.

Special ids come from the checkpoint, not the tokenizer: BOS, EOS and PAD from
generation_config.json, else config.json (see `hf_config.token_ids`). A checkpoint may have
several EOS ids; generation stops at any of them. The text is encoded as is, with the
tokenizer's own post-processor (which adds BOS for Llama-style tokenizers and nothing for
Qwen's), unless a chat template is requested.
"""

import json
import pathlib

import numpy as np
import tokenizers

from spac_jax.models import hf_config

TOKENIZER_FILE = 'tokenizer.json'
TOKENIZER_CONFIG_FILE = 'tokenizer_config.json'
CHAT_TEMPLATE_FILE = 'chat_template.jinja'
CHAT_TEMPLATES = ('', 'checkpoint')


class HFTokenizer:
  """Same interface as ByteTokenizer (encode, decode, bos_id, eos_id, pad_id, vocab_size).

  Attributes:
    bos_id: the BOS id, or None when the checkpoint has none (Qwen).
    eos_id: the first EOS id; eos_ids contains all of them.
    pad_id: the PAD id, else the first EOS id (padding is never attended to).
  """

  def __init__(self, directory: str | pathlib.Path, chat_template: str = ''):
    """Read tokenizer.json and the special ids of checkpoint `directory`.

    Args:
      directory: the checkpoint directory.
      chat_template: '' encodes prompts as is; 'checkpoint' wraps each prompt as one user
        message with the chat template of tokenizer_config.json.
    """
    directory = pathlib.Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
      raise FileNotFoundError(f'{path} not found; a Hugging Face checkpoint used with its '
                              f'tokenizer needs {TOKENIZER_FILE}.')
    try:
      self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for invalid files.
      raise ValueError(f'Cannot read tokenizer {path}: {error}.') from error
    ids = hf_config.token_ids(directory)
    if not ids['eos']:
      raise ValueError(f'{directory} sets no eos_token_id in generation_config.json or '
                       'config.json; generation needs one to stop.')
    self.bos_id = ids['bos'][0] if ids['bos'] else None
    self.eos_ids = tuple(ids['eos'])
    self.eos_id = self.eos_ids[0]
    self.pad_id = ids['pad'][0] if ids['pad'] else self.eos_id
    self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
    self.template = self._read_template(directory, chat_template)

  @staticmethod
  def _read_template(directory: pathlib.Path, chat_template: str):
    if chat_template not in CHAT_TEMPLATES:
      raise ValueError(f'chat_template={chat_template!r} is invalid; use one of '
                       f'{list(CHAT_TEMPLATES)}.')
    if not chat_template:
      return None
    # transformers 5 saves the template as chat_template.jinja; older versions put it in
    # tokenizer_config.json.
    path = directory / CHAT_TEMPLATE_FILE
    template = path.read_text(encoding='utf-8') if path.is_file() else None
    if template is None:
      path = directory / TOKENIZER_CONFIG_FILE
      template = hf_config.read_json(path).get('chat_template') if path.is_file() else None
    if not isinstance(template, str):
      raise ValueError(f"chat_template='checkpoint' needs {directory / CHAT_TEMPLATE_FILE} or "
                       f'a chat_template string in {path}; use '
                       "chat_template='' to encode prompts as is.")
    import jinja2.sandbox  # pylint: disable=import-outside-toplevel

    def raise_exception(message):
      raise ValueError(f'The chat template of {path} raised: {message}')

    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True,
                                                               lstrip_blocks=True)
    environment.globals['raise_exception'] = raise_exception
    environment.filters['tojson'] = json.dumps
    try:
      return environment.from_string(template)
    except jinja2.TemplateSyntaxError as error:
      raise ValueError(f'The chat template in {path} is invalid: {error} (line '
                       f'{error.lineno}).') from error

  def token_text(self, token_id: int | None) -> str:
    return '' if token_id is None else (self.tokenizer.id_to_token(token_id) or '')

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    """Encode `text`; `add_bos` applies the tokenizer's special tokens (its BOS, if any)."""
    if self.template is not None:
      text = self.template.render(messages=[{'role': 'user', 'content': text}],
                                  add_generation_prompt=True,
                                  bos_token=self.token_text(self.bos_id),
                                  eos_token=self.token_text(self.eos_id))
      # The rendered template already contains every special token the model expects.
      return self.tokenizer.encode(text, add_special_tokens=False).ids
    return self.tokenizer.encode(text, add_special_tokens=add_bos).ids

  def decode(self, ids) -> str:
    """Decode ids to text, skipping special tokens."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self.tokenizer.decode(ids, skip_special_tokens=True)
