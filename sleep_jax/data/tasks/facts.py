"""A world of fictional people and their attributes, as text (CPU-sized).

Each person has a unique two-part name and attributes (city, job, pet).
`passages(person, rng)` renders facts about them with paraphrase variety;
`recall_items(person)` gives closed-book completion prompts ("<Name> lives
in") with the attribute as the answer, using the first template of each
attribute so recall is asked in one fixed form. Same seed -> same world.
"""

from __future__ import annotations

import dataclasses

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

# Per attribute: templates; the first is the recall form (prompt + answer).
_TEMPLATES = {
    'city': ('{name} lives in {value}.', 'The home of {name} is {value}.',
             '{name} has a house in {value}.'),
    'job': ('{name} works as a {value}.', 'By trade, {name} is a {value}.',
            '{name} earns a living as a {value}.'),
    'pet': ('{name} owns a {value}.', 'The pet of {name} is a {value}.',
            '{name} takes care of a {value}.'),
}


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


def passages(person: Person, rng: np.random.Generator) -> list[str]:
  """One sentence per attribute, each in a randomly chosen paraphrase."""
  return [paraphrase(a, person.name, value, rng)
          for a, value in person.attributes]


def paraphrase(attribute: str, name: str, value: str,
               rng: np.random.Generator) -> str:
  """One fact in a randomly chosen paraphrase."""
  templates = _TEMPLATES[attribute]
  return templates[rng.integers(len(templates))].format(name=name, value=value)


def all_sentences(person: Person) -> list[str]:
  """Every paraphrase of every fact about `person`."""
  return [t.format(name=person.name, value=value)
          for a, value in person.attributes for t in _TEMPLATES[a]]


def recall_items(person: Person) -> list[tuple[str, str]]:
  """(prompt, answer) pairs: '<name> lives in' -> ' Aldport'."""
  items = []
  for a, value in person.attributes:
    prompt = _TEMPLATES[a][0].split('{value}')[0].format(name=person.name)
    items.append((prompt.rstrip(), ' ' + value))
  return items
