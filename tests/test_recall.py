"""The facts world and closed-book recall evaluation."""

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax import eval as eval_lib
from sleep_jax import sampling
from sleep_jax.data.tokenizers import SentencePieceTokenizer
from sleep_jax.studies import facts
from tiny_models import tiny_dense_model


def test_world_is_deterministic_and_names_are_unique():
  a, b = facts.make_people(200, 3), facts.make_people(200, 3)
  assert a == b
  assert len({p.name for p in a}) == 200
  assert facts.make_people(200, 4) != a
  person = a[0]
  rng = np.random.default_rng(0)
  text = ' '.join(facts.passages(person, rng))
  for _, value in person.attributes:
    assert value in text
  for item in facts.held_out_items(person) + facts.probe_items(person):
    attribute = item.id.split('/')[1]
    assert item.answer == ' ' + person.get(attribute)
    assert person.name in item.prompt and not item.prompt.endswith(' ')
  probe = {i.prompt for i in facts.probe_items(person)}
  assert f'{person.name} lives in' in probe | {
      i.prompt for i in facts.held_out_items(person)}


def test_recall_accuracy_equals_greedy_decoding_of_the_answer():
  people = facts.make_people(30, 0)
  tokenizer = SentencePieceTokenizer.train(
      [s for p in people for s in facts.passage_sentences(p)], 320)
  items = facts.pairs([it for p in people[:8]
                       for it in facts.held_out_items(p)])
  encoded = eval_lib.encode_items(tokenizer, items, 48)
  model, params, _ = tiny_dense_model(vocab_size=320, num_layers=1, d_ff=64)
  heads = [tokenizer.encode(p, add_bos=True) for p, _ in items]
  wants = [tokenizer.encode(p + a, add_bos=True)[len(h):]
           for (p, a), h in zip(items, heads)]
  prompts = np.zeros((len(items), max(map(len, heads))), np.int32)
  for i, h in enumerate(heads):
    prompts[i, :len(h)] = h
  out = sampling.sample(model, params, prompts, np.asarray(list(map(len, heads))),
                        max_new_tokens=max(map(len, wants)),
                        rng=jax.random.key(0))
  per_item = [np.asarray(out.tokens[i, :len(w)]).tolist() == w
              for i, w in enumerate(wants)]
  for i, w in enumerate(wants):
    assert encoded['answer_mask'][i].sum() == len(w)
  got = eval_lib.recall_accuracy(model, params, {}, encoded, batch_size=5)
  assert got == np.mean(per_item)
  # Items whose targets are the model's own argmax are recalled; the rest
  # keep their sampler-checked verdict.
  logits = model.apply({'params': params}, jnp.asarray(encoded['inputs']))
  argmax = np.asarray(jnp.argmax(logits, -1), np.int32)
  even = np.arange(len(items)) % 2 == 0
  mixed = dict(encoded, targets=np.where(even[:, None], argmax,
                                         encoded['targets']))
  want = np.mean(np.where(even, True, np.asarray(per_item)))
  assert eval_lib.recall_accuracy(model, params, {}, mixed) == want
  # Changing one answer token makes exactly that item wrong.
  broken = dict(mixed, targets=mixed['targets'].copy())
  pos = int(np.flatnonzero(mixed['answer_mask'][0])[-1])
  broken['targets'][0, pos] = (broken['targets'][0, pos] + 1) % 320
  assert eval_lib.recall_accuracy(model, params, {}, broken) == want - 1 / len(items)
