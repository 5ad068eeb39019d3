"""A world of fictional people and their attributes, as text (CPU-sized).

Each person has a unique two-part name and attributes (city, job, pet).
Every attribute can be stated in `len(_TEMPLATES[a])` forms. Per person
and attribute, `HELD_OUT_FORMS` of them are *held out*: they are never
written in any passage about that person, and only the final evaluation
asks them (`held_out_items`). The other forms are the person's *passage
forms*: `passages(person, rng)` renders facts in them, and `probe_items`
asks them — the only items any training, reward or selection signal may
use (a probe item is in a form the passages may state that fact in).

So a held-out question is a paraphrase the model never read about that
person (it read that form about other people): answering it needs the
fact, not the memorised sentence, as the paper's questions are not cloze
copies of its passages. Which forms a person holds out follows from their
name alone. Same seed -> same world.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import NamedTuple

import numpy as np

_ONSETS = ('b', 'd', 'f', 'g', 'k', 'l', 'm', 'n', 'p', 'r', 's', 't', 'v',
           'z', 'br', 'dr', 'gr', 'kl', 'st', 'tr')
_VOWELS = ('a', 'e', 'i', 'o', 'u', 'ai', 'ou')
_CODAS = ('', 'n', 'r', 'l', 's', 'th', 'x', 'm')

ATTRIBUTES = {
    'city': ('Aldport', 'Brindle', 'Corvale', 'Dunmere', 'Eastwick',
             'Fenhollow', 'Glenrock', 'Harwick', 'Ivystone', 'Kestrel',
             'Lowmarsh', 'Millbrook'),
    'job': ('baker', 'pilot', 'teacher', 'chemist', 'carpenter', 'nurse',
            'painter', 'farmer', 'librarian', 'engineer', 'tailor', 'sailor'),
    'pet': ('cat', 'dog', 'fox', 'owl', 'horse', 'goat', 'crow', 'otter',
            'parrot', 'rabbit', 'turtle', 'lizard'),
}

# Per attribute: the forms a fact can be stated in. Each ends with the
# value, so a form's prefix is a closed-book question and the value its
# answer.
_TEMPLATES = {
    'city': ('{name} lives in {value}.', 'The home of {name} is {value}.',
             '{name} has a house in {value}.', '{name} resides in {value}.',
             'The town where {name} lives is {value}.'),
    'job': ('{name} works as a {value}.', 'By trade, {name} is a {value}.',
            '{name} earns a living as a {value}.',
            '{name} is employed as a {value}.',
            'The job of {name} is that of a {value}.'),
    'pet': ('{name} owns a {value}.', 'The pet of {name} is a {value}.',
            '{name} takes care of a {value}.', '{name} keeps a {value}.',
            'The animal {name} looks after is a {value}.'),
}
# Forms per attribute that a person's passages never use (evaluation only).
HELD_OUT_FORMS = 2
# What the world's text looks like; part of every cached base model's key,
# so a model trained on another layout of the world is never reused.
# 2: held-out forms (before: every form in the passages, one recall form).
FORMAT_VERSION = 2


class Item(NamedTuple):
  """A closed-book question: `prompt` + `answer` is the fact in form `form`.
  `id` ("<name>/<attribute>/<form>") names it across the whole world."""
  id: str
  prompt: str
  answer: str


@dataclasses.dataclass(frozen=True)
class Person:
  name: str
  attributes: tuple[tuple[str, str], ...]  # (attribute, value), fixed order

  def get(self, attribute: str) -> str:
    return dict(self.attributes)[attribute]


def _syllable(rng) -> str:
  return (_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
          + _CODAS[rng.integers(len(_CODAS))])


def make_people(num_people: int, seed: int) -> list[Person]:
  """`num_people` people with unique names and uniformly drawn attributes."""
  if num_people < 1:
    raise ValueError(f'num_people={num_people} must be >= 1.')
  rng = np.random.default_rng(seed)
  names, people = set(), []
  while len(people) < num_people:
    name = ' '.join((_syllable(rng) + _syllable(rng)).capitalize()
                    for _ in range(2))
    if name in names:
      continue
    names.add(name)
    attrs = tuple((a, values[rng.integers(len(values))])
                  for a, values in ATTRIBUTES.items())
    people.append(Person(name, attrs))
  return people


def strangers(count: int, taken_names, seed: int) -> list[Person]:
  """`count` people whose names are not in `taken_names` (people met nowhere
  else in a world), drawn from a seed-derived stream."""
  taken = set(taken_names)
  people = make_people(count + len(taken), seed + 1_000_003)
  return [p for p in people if p.name not in taken][:count]


@functools.lru_cache(maxsize=None)
def held_out_forms(person: Person) -> dict[str, tuple[int, ...]]:
  """Per attribute, the forms never written about `person` (from the name
  alone, so adding people or sessions never moves anyone's split)."""
  seed = int.from_bytes(hashlib.sha256(person.name.encode()).digest()[:8],
                        'little')
  rng = np.random.default_rng(seed)
  return {a: tuple(sorted(int(f) for f in rng.permutation(
      len(_TEMPLATES[a]))[:HELD_OUT_FORMS])) for a, _ in person.attributes}


def passage_forms(person: Person, attribute: str) -> tuple[int, ...]:
  """The forms `person`'s passages may state `attribute` in."""
  held = held_out_forms(person)[attribute]
  return tuple(f for f in range(len(_TEMPLATES[attribute])) if f not in held)


def passages(person: Person, rng: np.random.Generator) -> list[str]:
  """One sentence per attribute, each in a randomly chosen passage form."""
  return [paraphrase(person, a, rng) for a, _ in person.attributes]


def paraphrase(person: Person, attribute: str,
               rng: np.random.Generator) -> str:
  """One fact about `person` in a randomly chosen passage form."""
  forms = passage_forms(person, attribute)
  form = forms[rng.integers(len(forms))]
  return _TEMPLATES[attribute][form].format(name=person.name,
                                            value=person.get(attribute))


def passage_sentences(person: Person) -> list[str]:
  """Every fact about `person` in every passage form (never a held-out
  one): what training and tokenizers may read."""
  return [_TEMPLATES[a][f].format(name=person.name, value=value)
          for a, value in person.attributes for f in passage_forms(person, a)]


def _item(person: Person, attribute: str, form: int) -> Item:
  prompt = _TEMPLATES[attribute][form].split('{value}')[0]
  return Item(f'{person.name}/{attribute}/{form}',
              prompt.format(name=person.name).rstrip(),
              ' ' + person.get(attribute))


def held_out_items(person: Person) -> list[Item]:
  """The final evaluation's questions about `person`, in forms no passage
  about them uses ('<name> resides in' -> ' Aldport'); never a training,
  reward or selection signal."""
  return [_item(person, a, f) for a, _ in person.attributes
          for f in held_out_forms(person)[a]]


def probe_items(person: Person) -> list[Item]:
  """Questions in `person`'s passage forms: the only items a reward or
  selection signal (dreaming's tau, a study's reward) may score."""
  return [_item(person, a, f) for a, _ in person.attributes
          for f in passage_forms(person, a)]


def pairs(items: list[Item]) -> list[tuple[str, str]]:
  """(prompt, answer) of each item, as `eval.encode_items` takes them."""
  return [(it.prompt, it.answer) for it in items]
