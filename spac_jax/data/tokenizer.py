"""Byte-level tokenizer of the embedded models: 256 byte values plus BOS, EOS and PAD."""

import numpy as np


class ByteTokenizer:
  """Maps UTF-8 bytes to ids 0..255; special tokens follow the bytes."""

  bos_id = 256
  eos_id = 257
  pad_id = 258
  vocab_size = 259

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    ids = list(text.encode('utf-8'))
    return [self.bos_id] + ids if add_bos else ids

  def decode(self, ids) -> str:
    """Decode ids to text; special tokens are skipped and invalid UTF-8 is replaced."""
    data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < 256)
    return data.decode('utf-8', errors='replace')
