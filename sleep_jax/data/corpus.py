"""A small generated English corpus for training tiny models offline.

Documents are a few templated sentences about invented people, places and
things, plus counting and small arithmetic, drawn deterministically from a
seed. The structure is simple enough that a ~2M-parameter model learns it in
minutes on a CPU, and varied enough that the loss keeps falling for a while.
"""

from __future__ import annotations

import numpy as np

_FIRST = ('Ada', 'Bruno', 'Chiara', 'Dmitri', 'Elif', 'Farid', 'Greta', 'Hugo',
          'Ines', 'Jonas', 'Kira', 'Lev', 'Mara', 'Nils', 'Olga', 'Pavel',
          'Quinn', 'Rosa', 'Sven', 'Tara', 'Umar', 'Vera', 'Wim', 'Yara')
_CITY = ('Aldport', 'Brindle', 'Corvale', 'Dunmere', 'Eastwick', 'Fenhollow',
         'Glenrock', 'Harwick', 'Ivystone', 'Juniper Bay')
_JOB = ('baker', 'pilot', 'teacher', 'chemist', 'carpenter', 'nurse',
        'painter', 'farmer', 'librarian', 'engineer')
_ANIMAL = ('cat', 'dog', 'fox', 'owl', 'horse', 'goat', 'crow', 'otter')
_ADJ = ('small', 'old', 'quiet', 'clever', 'brown', 'young', 'lazy', 'bright')
_VERB = ('watches', 'follows', 'chases', 'ignores', 'greets', 'finds')
_THING = ('the river', 'the market', 'the old bridge', 'the garden',
          'the red door', 'the station', 'the hill', 'the library')
_NUM = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight',
        'nine', 'ten', 'eleven', 'twelve', 'thirteen', 'fourteen', 'fifteen',
        'sixteen', 'seventeen', 'eighteen')


def _sentence(rng: np.random.Generator) -> str:
  pick = lambda xs: xs[rng.integers(len(xs))]
  kind = rng.integers(6)
  if kind == 0:
    return f'{pick(_FIRST)} lives in {pick(_CITY)} and works as a {pick(_JOB)}.'
  if kind == 1:
    return (f'In {pick(_CITY)}, the {pick(_ADJ)} {pick(_ANIMAL)} '
            f'{pick(_VERB)} the {pick(_ANIMAL)} near {pick(_THING)}.')
  if kind == 2:
    a, b = rng.integers(10), rng.integers(9)
    return f'{_NUM[a].capitalize()} plus {_NUM[b]} is {_NUM[a + b]}.'
  if kind == 3:
    start = rng.integers(10)
    run = ' '.join(_NUM[start:start + 4 + rng.integers(5)])
    return f'Counting: {run}.'
  if kind == 4:
    return (f'{pick(_FIRST)} met {pick(_FIRST)} at {pick(_THING)} in '
            f'{pick(_CITY)}.')
  return f'Every {pick(_ANIMAL)} in {pick(_CITY)} is {pick(_ADJ)}.'


def generate_corpus(num_documents: int, seed: int,
                    sentences_per_document: tuple[int, int] = (1, 4)
                    ) -> list[str]:
  """`num_documents` strings, each 1-4 sentences; same seed -> same corpus."""
  if num_documents < 1:
    raise ValueError(f'num_documents={num_documents} must be >= 1.')
  rng = np.random.default_rng(seed)
  low, high = sentences_per_document
  return [' '.join(_sentence(rng) for _ in range(rng.integers(low, high + 1)))
          for _ in range(num_documents)]
