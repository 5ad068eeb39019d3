"""all-MiniLM-L6-v2 in JAX: golden embeddings from transformers
(tools/make_minilm_golden.py), padding invariance, paraphrase ranking and
clear errors for broken checkpoints."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from sleep_jax.models import bert

DATA = os.path.join(os.path.dirname(__file__), 'testdata')


@pytest.fixture(scope='module')
def encoder():
  # A small batch keeps CPU time down and splits the 12 golden sentences
  # into two chunks, so the sort / un-sort path is exercised.
  return bert.SentenceEncoder.from_asset(batch_size=8)


def _cosine(a_NxD, b_NxD):
  return (a_NxD * b_NxD).sum(-1) / (np.linalg.norm(a_NxD, axis=-1)
                                    * np.linalg.norm(b_NxD, axis=-1))


def test_matches_transformers_golden(encoder):
  golden = np.load(os.path.join(DATA, 'minilm_golden.npz'))
  emb_NxD = encoder.encode(list(golden['sentences']))
  ref_NxD = golden['embeddings']
  assert emb_NxD.shape == ref_NxD.shape == (12, 384)
  assert emb_NxD.dtype == np.float32
  assert np.all(1.0 - _cosine(emb_NxD, ref_NxD) <= 1e-5)
  np.testing.assert_allclose(emb_NxD, ref_NxD, atol=1e-4, rtol=0)


def test_padding_does_not_matter(encoder, compile_counter):
  short = 'The cat sat on the mat.'
  long = ' '.join(['The quick brown fox jumps over the lazy dog.'] * 10)
  alone = encoder.encode([short])[0]
  batched = encoder.encode([long, short, 'Hi.'])
  assert len(encoder.tokenizer.encode(long).ids) > 100  # 128 bucket vs 16
  np.testing.assert_allclose(batched[1], alone, atol=1e-5, rtol=0)
  assert 1.0 - _cosine(batched[1], alone) <= 1e-5
  with compile_counter() as compiles:  # same length bucket: no recompile
    encoder.encode(['A different sentence, same bucket.'])
  assert compiles() == 0


# Kept out on purpose (cosines seen), as the encoder is close to a bag of
# words and a reward built on it misses role swaps, negation and swapped
# entities: "The dog bit the man." / "The man bit the dog." 0.98; "He finished
# the report before the deadline." / "He missed the deadline for the report."
# 0.87 (ties the weakest paraphrase below); "Alice lives in Paris." / "...
# Tokyo." 0.75 and "I love this movie." / "I hate this movie." 0.72, both
# above the true paraphrase "A man is playing a guitar." / "Someone is
# strumming a guitar." 0.72.
PARAPHRASES = [
    ('A man is playing a guitar.', 'A man plays the guitar.'),
    ('The children are playing in the park.', 'Kids are playing at the park.'),
    ('She bought a new car yesterday.',
     'Yesterday she purchased a new automobile.'),
    ('The restaurant was closed when we arrived.',
     'When we got there, the restaurant had already closed.'),
    ('Is it going to rain tomorrow?', 'Will there be rain tomorrow?'),
    ('The capital of France is Paris.', 'Paris is the capital city of France.'),
    ('The train to Boston leaves at 6 pm.',
     'The Boston train departs at 6 in the evening.'),
    ('Water boils at 100 degrees Celsius.',
     'At 100 degrees Celsius, water starts to boil.'),
    ('I cannot find my keys anywhere.',
     "I've lost my keys and can't find them."),
]
DIFFERENT = [  # most share many words with their partner
    ('How old are you?', 'How are you?'),
    ('The capital of France is Paris.', 'The capital of Japan is Tokyo.'),
    ('The train to Boston leaves at 6 pm.',
     'The train from Boston was cancelled.'),
    ('Water boils at 100 degrees Celsius.',
     'Water freezes at 0 degrees Celsius.'),
    ('The children are playing in the park.',
     'The children are sleeping at home.'),
    ('She bought a new car yesterday.', 'She sold her old bike last year.'),
    ('A man is playing a guitar.', 'A man is playing football.'),
    ('I cannot find my keys anywhere.',
     'I cannot find a good restaurant nearby.'),
    ('Alice lives in Paris.', 'Alice works in a bakery.'),
    ('The bank raised interest rates.', 'We sat on the bank of the river.'),
    ('The cat sat on the mat.', 'The stock market fell sharply on Tuesday.'),
]


def test_paraphrases_rank_above_different_meanings(encoder):
  pairs = PARAPHRASES + DIFFERENT
  cos_N = encoder.cosine([a for a, _ in pairs], [b for _, b in pairs])
  same, different = cos_N[:len(PARAPHRASES)], cos_N[len(PARAPHRASES):]
  # Seen: min paraphrase 0.866, max different 0.700.
  assert same.min() > different.max() + 0.1, (same, different)


_D, _F, _V, _P = 8, 16, 32, 16


def _tiny_checkpoint(path, prefix='', drop=None):
  """A random 1-layer BERT checkpoint (HF names) with a matching config."""
  rng = np.random.default_rng(0)
  shapes = {'embeddings.word_embeddings.weight': (_V, _D),
            'embeddings.position_embeddings.weight': (_P, _D),
            'embeddings.token_type_embeddings.weight': (2, _D),
            'pooler.dense.weight': (_D, _D), 'pooler.dense.bias': (_D,)}
  linears = {'attention.self.query': (_D, _D), 'attention.self.key': (_D, _D),
             'attention.self.value': (_D, _D),
             'attention.output.dense': (_D, _D),
             'intermediate.dense': (_F, _D), 'output.dense': (_D, _F)}
  for name, shape in linears.items():
    shapes[f'encoder.layer.0.{name}.weight'] = shape
    shapes[f'encoder.layer.0.{name}.bias'] = shape[:1]
  for name in ('embeddings.LayerNorm', 'encoder.layer.0.output.LayerNorm',
               'encoder.layer.0.attention.output.LayerNorm'):
    shapes[name + '.weight'] = shapes[name + '.bias'] = (_D,)
  tensors = {prefix + k: rng.normal(size=s).astype(np.float32)
             for k, s in shapes.items() if k != drop}
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, 'model.safetensors'))
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(dict(vocab_size=_V, hidden_size=_D, num_hidden_layers=1,
                   num_attention_heads=2, intermediate_size=_F,
                   max_position_embeddings=_P, type_vocab_size=2,
                   layer_norm_eps=1e-12, hidden_act='gelu'), f)
  return tensors


def test_loads_with_and_without_bert_prefix(tmp_path):
  plain = _tiny_checkpoint(tmp_path / 'plain')
  _tiny_checkpoint(tmp_path / 'prefixed', prefix='bert.')
  config, params = bert.load_bert(str(tmp_path / 'plain'))
  _, prefixed = bert.load_bert(str(tmp_path / 'prefixed'))
  assert config.num_layers == 1 and config.intermediate_size == _F
  np.testing.assert_array_equal(  # torch [out, in] -> flax [in, out]
      params['layer_0']['intermediate']['kernel'],
      plain['encoder.layer.0.intermediate.dense.weight'].T)
  jax.tree.map(np.testing.assert_array_equal, params, prefixed)
  hidden_BxLxD = bert.BertEncoder(config).apply(
      {'params': params}, np.array([[1, 5, 7, 0]]), np.array([[1, 1, 1, 0]]))
  assert hidden_BxLxD.shape == (1, 4, _D)
  assert np.all(np.isfinite(hidden_BxLxD))


def test_missing_tensor_is_named(tmp_path):
  key = 'encoder.layer.0.attention.self.key.bias'
  _tiny_checkpoint(tmp_path, drop=key)
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    bert.load_bert(str(tmp_path))
