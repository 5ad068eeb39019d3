"""grain input pipelines for language modelling.

A source is any random-access sequence of int32 token arrays (one document
each): an in-memory list, or `ArrayRecordTokens` over array_record files.
`lm_dataset` turns it into batches of

    inputs, targets, mask, positions, segment_ids   (all int32[batch, seq_len])

either packed (several documents per row; attention stays within a document
through `segment_ids`, positions restart per document) or padded (one
document per row). Documents longer than seq_len + 1 are truncated.

The pipeline is a grain `IterDataset`; its iterator has `get_state()` /
`set_state()` and is saved in every checkpoint, so a resumed run sees exactly
the batches an uninterrupted run would.
"""

from __future__ import annotations

from typing import Sequence

from array_record.python import array_record_module
import grain
import numpy as np


def write_array_record(path: str, documents: Sequence[Sequence[int]]) -> None:
  """Writes token documents (int32) to one array_record file."""
  writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  for doc in documents:
    writer.write(np.asarray(doc, np.int32).tobytes())
  writer.close()


class ArrayRecordTokens:
  """Random-access source of int32 token documents from array_record files."""

  def __init__(self, paths: str | Sequence[str]):
    self._source = grain.sources.ArrayRecordDataSource(
        [paths] if isinstance(paths, str) else list(paths))

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray:
    return np.frombuffer(self._source[index], np.int32)


def _to_lm_example(tokens, segment_ids, positions):
  """Shifts one row of seq_len + 1 tokens into inputs/targets/mask."""
  same_doc = (segment_ids[1:] == segment_ids[:-1]) & (segment_ids[1:] != 0)
  return {
      'inputs': tokens[:-1].astype(np.int32),
      'targets': tokens[1:].astype(np.int32),
      'mask': same_doc.astype(np.int32),
      'positions': positions[:-1].astype(np.int32),
      'segment_ids': segment_ids[:-1].astype(np.int32),
  }


def pad_document(tokens: np.ndarray, width: int, pad_id: int):
  """One document as one next-token row of `width` tokens (truncated)."""
  n = min(len(tokens), width)
  row = np.full((width,), pad_id, np.int32)
  row[:n] = tokens[:n]
  segment_ids = (np.arange(width) < n).astype(np.int32)
  return _to_lm_example(row, segment_ids, np.arange(width, dtype=np.int32))


def _unpack(packed):
  return _to_lm_example(packed['tokens'], packed['tokens_segment_ids'],
                        packed['tokens_positions'])


def lm_dataset(source, *, seq_len: int, batch_size: int, seed: int,
               packing: bool = True, shuffle: bool = True,
               num_epochs: int | None = None, pad_id: int = 0,
               shard_index: int = 0, shard_count: int = 1,
               num_packing_bins: int | None = None) -> grain.IterDataset:
  """Batches of next-token examples from `source`.

  Args:
    source: random-access sequence of 1-D int token arrays.
    seq_len: model input length (rows hold seq_len + 1 tokens before the
      shift into inputs/targets).
    batch_size: rows per global batch (all processes together).
    seed: shuffling and packing seed.
    packing: pack several documents per row (else one padded doc per row).
    shuffle: shuffle documents (reshuffled every epoch).
    num_epochs: None repeats forever.
    pad_id: padding token.
    shard_index, shard_count: this process's rows of each global batch
      (`jax.process_index()`, `jax.process_count()`): every process builds
      the same global stream (documents are cheap to shuffle and pack) and
      keeps its contiguous slice, so the batches, and every number trained
      from them, do not depend on the number of processes.
    num_packing_bins: rows packed at once (default: batch_size).
  """
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'seq_len={seq_len} and batch_size={batch_size} must be '
                     'positive.')
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index={shard_index} must be in [0, '
                     f'shard_count={shard_count}).')
  if batch_size % shard_count:
    raise ValueError(f'batch_size={batch_size} rows cannot be split evenly '
                     f'over {shard_count} processes.')
  width = seq_len + 1
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.map(lambda doc: np.asarray(doc, np.int32)[:width])
  if packing:
    ds = ds.map(lambda doc: {'tokens': doc}).to_iter_dataset()
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={'tokens': width},
        num_packing_bins=num_packing_bins or batch_size, seed=seed,
        shuffle_bins=shuffle, padding_struct={'tokens': pad_id})
    ds = ds.map(_unpack)
  else:
    ds = ds.map(lambda doc: pad_document(doc, width, pad_id)).to_iter_dataset()
  ds = ds.batch(batch_size, drop_remainder=True)
  if shard_count == 1:
    return ds
  rows = batch_size // shard_count
  start = shard_index * rows
  return ds.map(lambda batch: {k: v[start:start + rows]
                               for k, v in batch.items()})
