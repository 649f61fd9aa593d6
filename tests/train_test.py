"""Training: the smoke config trains both models and writes loadable checkpoints."""

import json
import subprocess
import sys

import numpy as np

from configs import default
from spac_jax.data import corpus
from spac_jax.data.tokenizer import ByteTokenizer
from spac_jax.models import checkpoint


def test_smoke_training_writes_checkpoints(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'spac_jax.train', '--config=configs/train_embedded.py:smoke',
       f'--workdir={tmp_path}'], cwd=default.REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((tmp_path / 'training.json').read_text())
  assert record['target']['steps'] == 3
  assert len(record['target']['expert_load']) == 4  # One load vector per MoE layer.
  assert np.isfinite(record['draft']['history'][-1]['validation_loss'])
  target = checkpoint.load(tmp_path / 'target')
  assert target.cfg.num_experts == 8
  assert checkpoint.load(tmp_path / 'draft').cfg.num_experts == 0


def test_existing_workdir_rejected_before_training(tmp_path):
  (tmp_path / 'target').mkdir()
  result = subprocess.run(
      [sys.executable, '-m', 'spac_jax.train', '--config=configs/train_embedded.py:smoke',
       f'--workdir={tmp_path}'], cwd=default.REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'already exist; choose a new --workdir' in result.stderr
  assert 'train target' not in result.stderr  # No training step ran.


def test_corpus_split_is_disjoint_and_stable():
  files = corpus.stdlib_source_files()
  validation = [f for f in files if corpus.is_validation_file(f, 0.02)]
  assert 0 < len(validation) < len(files) // 10
  assert validation == [f for f in files if corpus.is_validation_file(f, 0.02)]


def test_byte_tokenizer_round_trip():
  tokenizer = ByteTokenizer()
  text = 'def café():\n\treturn "ok"'
  ids = tokenizer.encode(text)
  assert ids[0] == tokenizer.bos_id
  assert max(ids[1:]) < 256
  assert tokenizer.decode(ids + [tokenizer.eos_id]) == text


def test_sample_windows_shape():
  stream = np.arange(1000)
  windows = corpus.sample_windows(stream, 4, 16, np.random.default_rng(0))
  assert windows.shape == (4, 17)
  assert (np.diff(windows, axis=1) == 1).all()
