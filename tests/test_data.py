"""Corpus, tokenizer and grain pipelines."""

import numpy as np
import pytest

from sleep_jax.data import corpus, pipeline, tokenizers

DOCS = [np.arange(1, n + 1, dtype=np.int32) + 100 * i
        for i, n in enumerate([3, 5, 2, 7, 4, 6, 1, 8, 12, 3, 9, 2])]


def test_corpus_is_deterministic():
  assert corpus.generate_corpus(50, seed=1) == corpus.generate_corpus(50, seed=1)
  assert corpus.generate_corpus(50, seed=1) != corpus.generate_corpus(50, seed=2)


def test_sentencepiece_trains_deterministically_and_round_trips(tmp_path):
  texts = corpus.generate_corpus(500, seed=0)
  tok = tokenizers.SentencePieceTokenizer.train(texts, 400)
  again = tokenizers.SentencePieceTokenizer.train(texts, 400)
  assert tok.encode(texts[0]) == again.encode(texts[0])
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 2, 3, 400)
  # Byte fallback: text the corpus never showed still round-trips.
  for text in (texts[3], 'Grüße, 東京! ¿Qué tal? — ok'):
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
  # Ids past the vocabulary (a model's padded embedding rows) are dropped.
  assert tok.decode(tok.encode(texts[0]) + [400, 511]) == texts[0]
  path = str(tmp_path / tokenizers.TOKENIZER_FILENAME)
  tok.save(path)
  assert tokenizers.SentencePieceTokenizer.load(path).encode(texts[1]) == tok.encode(texts[1])


def _first_batches(ds, n):
  it = iter(ds)
  return [next(it) for _ in range(n)]


def test_packed_batches_hold_whole_documents_with_correct_masks():
  ds = pipeline.lm_dataset(DOCS, seq_len=8, batch_size=2, seed=0, packing=True)
  seen = []
  for batch in _first_batches(ds, 6):
    assert batch['inputs'].shape == (2, 8)
    for row in range(2):
      seg, pos = batch['segment_ids'][row], batch['positions'][row]
      for s in set(seg.tolist()) - {0}:
        cols = np.flatnonzero(seg == s)
        np.testing.assert_array_equal(pos[cols], np.arange(len(cols)))
        doc = batch['inputs'][row, cols]
        seen.append(int(doc[0]))
        # Within a document targets are the next tokens, and the mask is 1
        # except at the document's last input position when the next column
        # starts another document.
        np.testing.assert_array_equal(batch['targets'][row, cols[:-1]], doc[1:])
        assert batch['mask'][row, cols[:-1]].all()
      # Padding (segment 0) is never a target.
      assert not batch['mask'][row][seg == 0].any()
  assert len(set(seen)) > 6  # many different documents, shuffled in


def test_padded_batches_are_one_document_per_row():
  ds = pipeline.lm_dataset(DOCS, seq_len=6, batch_size=3, seed=0, packing=False,
                           shuffle=False, num_epochs=1)
  batches = list(ds)
  assert len(batches) == len(DOCS) // 3
  first = batches[0]
  np.testing.assert_array_equal(first['inputs'][0], [1, 2, 3, 0, 0, 0])
  np.testing.assert_array_equal(first['mask'][0], [1, 1, 0, 0, 0, 0])
  # A 7-token document truncated to seq_len + 1 = 7 tokens: all 6 targets.
  np.testing.assert_array_equal(batches[1]['mask'][0], [1] * 6)


def test_iterator_state_round_trips():
  ds = pipeline.lm_dataset(DOCS, seq_len=8, batch_size=2, seed=3)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  fresh = iter(pipeline.lm_dataset(DOCS, seq_len=8, batch_size=2, seed=3))
  fresh.set_state(state)
  for want in expected:
    got = next(fresh)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_process_shards_are_the_rows_of_the_one_process_batches():
  whole = _first_batches(pipeline.lm_dataset(DOCS, seq_len=8, batch_size=6,
                                             seed=0), 3)
  parts = [_first_batches(pipeline.lm_dataset(
      DOCS, seq_len=8, batch_size=6, seed=0, shard_index=i, shard_count=3), 3)
           for i in range(3)]
  for step, batch in enumerate(whole):
    for key in batch:
      assert all(p[step][key].shape[0] == 2 for p in parts)
      np.testing.assert_array_equal(
          np.concatenate([p[step][key] for p in parts]), batch[key])


def test_array_record_source_matches_memory(tmp_path):
  path = str(tmp_path / 'docs.array_record')
  pipeline.write_array_record(path, DOCS)
  source = pipeline.ArrayRecordTokens(path)
  assert len(source) == len(DOCS)
  for want, got in zip(DOCS, (source[i] for i in range(len(source)))):
    np.testing.assert_array_equal(want, got)
  a = _first_batches(pipeline.lm_dataset(source, seq_len=8, batch_size=2, seed=1), 3)
  b = _first_batches(pipeline.lm_dataset(DOCS, seq_len=8, batch_size=2, seed=1), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['inputs'], y['inputs'])


def test_bad_pipeline_arguments():
  with pytest.raises(ValueError, match='shard_index=3'):
    pipeline.lm_dataset(DOCS, seq_len=8, batch_size=2, seed=0, shard_index=3,
                        shard_count=2)
  with pytest.raises(ValueError, match='batch_size=5 rows cannot be split'):
    pipeline.lm_dataset(DOCS, seq_len=8, batch_size=5, seed=0, shard_index=0,
                        shard_count=2)
  with pytest.raises(ValueError, match='seq_len=0'):
    pipeline.lm_dataset(DOCS, seq_len=0, batch_size=2, seed=0)


def test_hf_tokenizer_json_round_trips(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
      corpus.generate_corpus(300, seed=0),
      trainers.BpeTrainer(vocab_size=400, special_tokens=['<s>', '</s>'],
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  path = str(tmp_path / 'tokenizer.json')
  tok.save(path)
  loaded = tokenizers.HFTokenizer.from_file(path, bos_token='<s>',
                                            eos_token='</s>')
  text = 'Ada lives in Grüßburg, 東京 — ok?'
  ids = loaded.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == loaded.bos_id == 0 and ids[-1] == loaded.eos_id == 1
  assert loaded.decode(ids) == text
  assert ids[1:-1] == tok.encode(text).ids
