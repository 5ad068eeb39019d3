r"""Writes tests/testdata/minilm_golden.npz: reference all-MiniLM-L6-v2
sentence embeddings from PyTorch + transformers, for tests/test_bert.py.

    pip install -e '.[golden]'
    python -m sleep_jax.assets fetch minilm-l6-v2
    python tools/make_minilm_golden.py [MODEL_DIR]   # default: the asset's dir

Embeddings are the mean of the last hidden states over non-pad tokens (the
sentence-transformers Pooling module), before its Normalize module. Inputs are
truncated to max_seq_length (sentence_bert_config.json), as in
sentence-transformers.
"""

import json
import os
import sys

import numpy as np
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, 'tests', 'testdata', 'minilm_golden.npz')
SENTENCES = [
    'A man is playing a guitar.',
    'Someone is strumming a guitar.',
    'The stock market fell sharply on Tuesday.',
    'Hello!',
    'Pi is approximately 3.14159, and e is about 2.71828.',
    'Is it going to rain tomorrow?',
    'Will there be rain tomorrow?',
    'The cat sat on the mat.',
    'Quantum computers exploit superposition and entanglement.',
    'Wait... what?! No way -- that\'s "impossible" (or is it?).',
    ('In 1969, Apollo 11 landed on the Moon: Neil Armstrong and Buzz Aldrin '
     'walked on the surface for about two and a half hours, while Michael '
     'Collins orbited above in the command module Columbia, before all three '
     'returned safely to Earth on July 24.'),
    'I forgot my umbrella, so I got soaked on the way home.',
]


def main(argv):
  if len(argv) > 1:
    model_dir = argv[1]
  else:
    sys.path.insert(0, ROOT)
    from sleep_jax import assets  # pylint: disable=import-outside-toplevel
    model_dir = os.path.dirname(assets.fetch('minilm-l6-v2'))
  with open(os.path.join(model_dir, 'sentence_bert_config.json')) as f:
    max_len = json.load(f)['max_seq_length']
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  model = transformers.AutoModel.from_pretrained(
      model_dir, dtype=torch.float32).eval()
  batch = tokenizer(SENTENCES, padding=True, truncation=True,
                    max_length=max_len, return_tensors='pt')
  with torch.no_grad():
    hidden = model(**batch).last_hidden_state
  mask = batch['attention_mask'].unsqueeze(-1).float()
  emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
  lengths = batch['attention_mask'].sum(1).numpy()
  print('token lengths:', lengths.tolist())
  assert lengths.max() > 40, 'want one sentence longer than 40 tokens'
  np.savez_compressed(OUT, sentences=np.array(SENTENCES),
                      embeddings=emb.numpy().astype(np.float32))
  print(f'wrote {OUT}: {emb.shape}')


if __name__ == '__main__':
  main(sys.argv)
