"""SQuAD for knowledge incorporation: reading, splitting, serving, grading."""

import json

import grain
import numpy as np
import pytest

from sleep_jax import assets
from sleep_jax.data.tasks import squad


@pytest.fixture(scope='module')
def real_file():
  return assets.fetch(squad.ASSET, verbose=False)


@pytest.fixture(scope='module')
def real(real_file):
  return squad.load()


def squad_json(version, articles):
  return {'version': version, 'data': [
      {'title': title, 'paragraphs': [{'context': context, 'qas': qas}
                                      for context, qas in paragraphs]}
      for title, paragraphs in articles]}


def qa(qid, question, *answers, impossible=None):
  out = {'id': qid, 'question': question,
         'answers': [{'text': a, 'answer_start': 0} for a in answers]}
  if impossible is not None:
    out['is_impossible'] = impossible
  return out


# ------------------------------------------------------------ real asset ---


def test_the_bundled_dev_file(real, real_file):
  # Counted on the file: all 1,204 paragraphs of its 35 articles have at
  # least one answerable question; 5,928 of its 11,873 questions are
  # answerable.
  assert len(real) == 1204
  assert sum(len(p.questions) for p in real) == 5928
  assert len({p.title for p in real}) == 35
  assert len({p.id for p in real}) == 1204
  assert real[0].id == 'Normans/0' and real[0].title == 'Normans'
  # Four annotators, two distinct answers, file order kept.
  assert real[0].questions[1].answers == ('10th and 11th centuries',
                                          'in the 10th and 11th centuries')
  with open(real_file) as f:
    raw = json.load(f)
  impossible = {q['id'] for a in raw['data'] for p in a['paragraphs']
                for q in p['qas'] if q['is_impossible']}
  assert len(impossible) == 11873 - 5928
  kept = {q.id for p in real for q in p.questions}
  assert not kept & impossible
  assert all(q.answers and len(set(q.answers)) == len(q.answers)
             for p in real for q in p.questions)


def test_split_is_disjoint_deterministic_and_order_free(real):
  train, evaluation = squad.split(real, train=300, eval=200, seed=0)
  assert len(train) == 300 and len(evaluation) == 200
  assert not {p.id for p in train} & {p.id for p in evaluation}
  again = squad.split(real, train=300, eval=200, seed=0)
  assert again == (train, evaluation)
  shuffled = [real[i] for i in np.random.default_rng(7).permutation(len(real))]
  assert squad.split(shuffled, train=300, eval=200, seed=0) == again
  other = squad.split(real, train=300, eval=200, seed=1)
  assert [p.id for p in other[0]] != [p.id for p in train]
  # A larger request extends the smaller one: same seed, same order.
  more = squad.split(real, train=300, eval=400, seed=0)
  assert more[0] == train and more[1][:200] == evaluation
  with pytest.raises(ValueError, match='train=1000 \\+ eval=205 .* 1204'):
    squad.split(real, train=1000, eval=205, seed=0)


def test_split_needs_unique_ids():
  p = squad.Passage('T/0', 'T', 'c', (squad.Question('q', 'q?', ('a',)),))
  with pytest.raises(ValueError, match="'T/0' is not unique"):
    squad.split([p, p], train=1, eval=1, seed=0)


# ---------------------------------------------------------- JSON fixtures ---


def test_read_json_v11(tmp_path):
  path = tmp_path / 'v11.json'
  path.write_text(json.dumps(squad_json('1.1', [
      ('Moon', [('The Moon orbits Earth.',
                 [qa('m1', 'What orbits Earth?', 'The Moon', 'Moon',
                     'The Moon')]),
                ('It is 384,400 km away.',
                 [qa('m2', 'How far?', '384,400 km')])]),
      ('Sun', [('The Sun is a star.',
                [qa('s1', 'What is the Sun?', 'a star')])]),
  ])))
  passages = squad.read_json(str(path))
  assert passages == [
      squad.Passage('Moon/0', 'Moon', 'The Moon orbits Earth.', (
          squad.Question('m1', 'What orbits Earth?', ('The Moon', 'Moon')),)),
      squad.Passage('Moon/1', 'Moon', 'It is 384,400 km away.', (
          squad.Question('m2', 'How far?', ('384,400 km',)),)),
      squad.Passage('Sun/0', 'Sun', 'The Sun is a star.', (
          squad.Question('s1', 'What is the Sun?', ('a star',)),)),
  ]
  assert squad.load(str(path)) == passages


def test_read_json_v20_drops_unanswerable(tmp_path):
  path = tmp_path / 'v20.json'
  path.write_text(json.dumps(squad_json('v2.0', [
      ('Moon', [('Only impossible here.',
                 [qa('x1', 'Who lives there?', impossible=True)]),
                ('The Moon orbits Earth.',
                 [qa('x2', 'What does Mars orbit?', impossible=True),
                  qa('m1', 'What orbits Earth?', 'The Moon', impossible=False),
                  qa('x3', 'No answers given?')])]),
  ])))
  # Paragraph 0 has no answerable question: dropped, but 'Moon/1' keeps
  # its index in the article.
  assert squad.read_json(str(path)) == [
      squad.Passage('Moon/1', 'Moon', 'The Moon orbits Earth.', (
          squad.Question('m1', 'What orbits Earth?', ('The Moon',)),))]


@pytest.mark.parametrize('content, message', [
    ('{"version": "v2.0", "data": [', 'is not JSON'),
    ('[1, 2]', r'<file> is a list, not an object'),
    ('{"train": {}}', r"<file>\.data is missing or not a list \(keys: "
                      r"\['train'\]\)"),
    ('{"data": [{"title": "T", "paragraphs": [{"context": "c"}]}]}',
     r"data\[0\]\.paragraphs\[0\]\.qas is missing or not a list"),
    ('{"data": [{"title": "T", "paragraphs": [{"context": "c", "qas": '
     '[{"id": "q", "question": "?", "answers": [{"answer_start": 0}]}]}]}]}',
     r"qas\[0\]\.answers\[0\]\.text is missing or not a str"),
    ('{"data": [{"title": "T", "paragraphs": ["c"]}]}',
     r"data\[0\]\.paragraphs\[0\] is a str, not an object"),
])
def test_read_json_rejects_other_files(tmp_path, content, message):
  path = tmp_path / 'bad.json'
  path.write_text(content)
  with pytest.raises(ValueError, match=message) as e:
    squad.read_json(str(path))
  assert str(path) in str(e.value) and 'SQuAD v1.1/v2.0' in str(e.value)
  assert '\n' not in str(e.value)


# ------------------------------------------------------------------ grain ---


def test_question_source_serves_every_question_once_in_order():
  q = lambda i: squad.Question(f'q{i}', f'question {i}?', (f'a{i}', f'b{i}'))
  passages = [squad.Passage('A/0', 'A', 'ctx a', (q(0), q(1))),
              squad.Passage('A/1', 'A', 'ctx b', (q(2),)),
              squad.Passage('B/0', 'B', 'ctx c', (q(3), q(4), q(5)))]
  source = squad.QuestionSource(passages)
  assert len(source) == 6
  records = list(grain.MapDataset.source(source))
  assert records == [
      dict(passage_index=p, passage_id=passages[p].id,
           question=f'question {i}?', answers=(f'a{i}', f'b{i}'))
      for p, i in ((0, 0), (0, 1), (1, 2), (2, 3), (2, 4), (2, 5))]
  assert grain.MapDataset.source(source)[4]['passage_id'] == 'B/0'


# ------------------------------------------------------------------- TFDS ---


def tfds_example(qid, title, context, question, *answers):
  """One example as tfds.as_numpy yields it for the `squad` dataset."""
  return {'id': qid.encode(), 'title': title.encode(),
          'context': context.encode(), 'question': question.encode(),
          'answers': {'text': np.array([a.encode() for a in answers], object),
                      'answer_start': np.zeros(len(answers), np.int32)}}


TFDS_EXAMPLES = [
    tfds_example('1', 'Moon', 'ctx one', 'q one?', 'Moon', 'the Moon', 'Moon'),
    tfds_example('2', 'Sun', 'ctx sun', 'q sun?', 'star'),
    tfds_example('3', 'Moon', 'ctx two', 'q two?', '384,400 km'),
    tfds_example('4', 'Moon', 'ctx one', 'q three?', 'Earth'),
    tfds_example('5', 'Moon', 'ctx three', 'q none?'),  # no answer: dropped
]


def test_from_tfds_examples_groups_questions_by_paragraph():
  assert squad.from_tfds_examples(TFDS_EXAMPLES) == [
      squad.Passage('Moon/0', 'Moon', 'ctx one', (
          squad.Question('1', 'q one?', ('Moon', 'the Moon')),
          squad.Question('4', 'q three?', ('Earth',)))),
      squad.Passage('Sun/0', 'Sun', 'ctx sun', (
          squad.Question('2', 'q sun?', ('star',)),)),
      squad.Passage('Moon/1', 'Moon', 'ctx two', (
          squad.Question('3', 'q two?', ('384,400 km',)),)),
  ]
  with pytest.raises(ValueError, match=r"example 0 lacks \['context'\]"):
    squad.from_tfds_examples([{k: v for k, v in TFDS_EXAMPLES[0].items()
                               if k != 'context'}])


def test_load_tfds_reads_mock_data_offline(monkeypatch):
  """TFDS's own mock of the `squad` dataset (random texts, no download);
  TensorFlow is not installed here, so this reads through tfds.data_source."""
  tfds = pytest.importorskip('tensorflow_datasets')
  monkeypatch.setattr(squad, '_has_tensorflow', lambda: False)
  with tfds.testing.mock_data(num_examples=6):
    passages = squad.load_tfds(split='validation', data_dir='/nonexistent')
    source = tfds.data_source('squad', split='validation')
    raw = [source[i] for i in range(len(source))]
  expected = {(squad._text(ex['title'], ''), squad._text(ex['context'], ''),
               squad._text(ex['question'], ''))
              for ex in raw if len(ex['answers']['text'])}
  assert expected and {(p.title, p.context, q.question) for p in passages
                       for q in p.questions} == expected
  assert all(q.answers for p in passages for q in p.questions)


def test_load_tfds_uses_tfds_load_when_tensorflow_is_there(monkeypatch):
  """The tf.data path, with tfds.load and tfds.as_numpy replaced (there is
  no TensorFlow to run them here)."""
  tfds = pytest.importorskip('tensorflow_datasets')
  calls = []
  monkeypatch.setattr(squad, '_has_tensorflow', lambda: True)
  monkeypatch.setattr(tfds, 'load', lambda name, **kw: calls.append(
      (name, kw)) or 'dataset')
  monkeypatch.setattr(tfds, 'as_numpy', lambda ds: iter(
      TFDS_EXAMPLES) if ds == 'dataset' else None)
  passages = squad.load_tfds(split='train[:5]', data_dir='/d', download=False)
  assert calls == [('squad', dict(split='train[:5]', data_dir='/d',
                                  download=False))]
  assert passages == squad.from_tfds_examples(TFDS_EXAMPLES)


# ---------------------------------------------------------------- grading ---


def test_normalize_answer():
  assert squad.normalize_answer(' The  Quick,  fox. ') == 'quick fox'
  assert squad.normalize_answer('U.S.') == 'us'
  assert squad.normalize_answer('An apple, the theater') == 'apple theater'
  # Punctuation goes before articles: 'the-end' -> 'theend', no article left.
  assert squad.normalize_answer('the-end') == 'theend'
  assert squad.normalize_answer('The a an') == ''


@pytest.mark.parametrize('prediction, answers, exact, f1', [
    # 'the eiffel tower!' -> 'eiffel tower' == 'eiffel tower'.
    ('the Eiffel Tower!', ['Eiffel tower'], 1.0, 1.0),
    # pred [in, 10th, century], gold [10th, and, 11th, centuries]; common
    # {10th}: P = 1/3, R = 1/4, F1 = 2*(1/12)/(7/12) = 2/7.
    ('in the 10th century', ['10th and 11th centuries'], 0.0, 2 / 7),
    # Multiple golds, max: pred [norman, conquest, of, england] vs
    # [norman, conquest]: P = 2/4, R = 1, F1 = 2*(1/2)/(3/2) = 2/3;
    # vs [england]: P = 1/4, R = 1, F1 = 2*(1/4)/(5/4) = 2/5. Max 2/3.
    ('Norman conquest of England', ['Norman conquest', 'England'], 0.0, 2 / 3),
    ('Normans', ['Norman conquest', 'the Normans'], 1.0, 1.0),
    # Counter overlap: [cat, cat, cat] vs [cat, sat] share 1 token:
    # P = 1/3, R = 1/2, F1 = 2*(1/6)/(5/6) = 2/5.
    ('the the cat cat cat', ['cat sat'], 0.0, 2 / 5),
    # Empty prediction: no tokens vs [france] -> F1 = (0 tokens == 1) = 0.
    ('', ['France'], 0.0, 0.0),
    # Articles only normalise to '' as well.
    ('The a an', ['France'], 0.0, 0.0),
    # A gold of articles only is ignored; with none left the gold is ''.
    ('the', ['The'], 1.0, 1.0),
    ('', ['the', 'France'], 0.0, 0.0),
    ('', [], 1.0, 1.0),
    ('theend', ['the-end'], 1.0, 1.0),
    ('end', ['the-end'], 0.0, 0.0),
])
def test_exact_match_and_f1(prediction, answers, exact, f1):
  assert squad.exact_match(prediction, answers) == exact
  assert squad.f1(prediction, answers) == pytest.approx(f1, abs=1e-12)


class ContainsJudge:
  """Same meaning = one text contains the other (lower-cased)."""

  def __init__(self):
    self.calls = []

  def same_meaning(self, a_texts, b_texts):
    self.calls.append((list(a_texts), list(b_texts)))
    return np.array([a.lower() in b.lower() or b.lower() in a.lower()
                     for a, b in zip(a_texts, b_texts)])


def test_grade():
  predictions = ['the Eiffel Tower!', 'in the 10th century', 'Paris', 'Rome']
  answers = [('Eiffel tower',), ('10th and 11th centuries', '10th century'),
             ('London', 'Paris, France'), ('Lisbon',)]
  judge = ContainsJudge()
  scores = squad.grade(predictions, answers, judge=judge)
  np.testing.assert_array_equal(scores['exact'], [1, 0, 0, 0])
  # Question 2, best gold [10th, century] vs [in, 10th, century]: P = 2/3,
  # R = 1, F1 = 2*(2/3)/(5/3) = 4/5. Question 3: [paris] vs [paris, france]:
  # P = 1, R = 1/2, F1 = 2*(1/2)/(3/2) = 2/3.
  np.testing.assert_allclose(scores['f1'], [1, 4 / 5, 2 / 3, 0])
  np.testing.assert_array_equal(scores['semantic'], [1, 1, 1, 0])
  assert judge.calls == [(
      ['the Eiffel Tower!', 'in the 10th century', 'in the 10th century',
       'Paris', 'Paris', 'Rome'],
      ['Eiffel tower', '10th and 11th centuries', '10th century', 'London',
       'Paris, France', 'Lisbon'])]
  assert set(squad.grade(predictions, answers)) == {'exact', 'f1'}
  with pytest.raises(ValueError, match='3 predictions for 4 answer lists'):
    squad.grade(predictions[:3], answers)
