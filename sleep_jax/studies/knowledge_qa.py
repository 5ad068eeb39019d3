"""The knowledge study's backbone and closed-book QA protocol.

* `load_backbone`: a pretrained model the project loads (a GGUF file, an
  asset holding one, or a Hugging Face checkpoint directory), or a tiny
  random llama (`source='random'`, smoke runs), with small fast CMS levels
  added in front of its MLPs (`cms.add_fast_levels`: the backbone MLP is the
  slowest level, and at this point the model computes exactly the
  backbone's logits).
* Prompts: the tokenizer's chat template when it has one (instruct
  models), with one worked example so that a small model answers with a
  short phrase; plain "Question: ... Answer:" text otherwise.
* `answer`: greedy answers, every batch padded to one shape, so a study
  compiles the sampler once per model.
* `answer_items`: teacher-forced (question prompt, gold answer) items, the
  tau of ReST-EM's isolated copies (answer log-probability), for training
  passages only.
"""

from __future__ import annotations

import dataclasses
import os
import string
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sleep_jax import assets
from sleep_jax import sampling
from sleep_jax.data.tokenizers import CharTokenizer, HFTokenizer
from sleep_jax.models import Transformer, TransformerConfig, cms
from sleep_jax.models.config import CMSLevel

# Characters of the random backbone's tokenizer (smoke runs on ASCII text).
RANDOM_ALPHABET = string.ascii_letters + string.digits + string.punctuation + ' \n'

# The worked example before each question: it shows a small instruct model
# the answer format (a short phrase), and is about no evaluated passage.
EXAMPLE = ('The Eiffel Tower is a wrought-iron lattice tower in Paris. It was '
           "completed in 1889 as the entrance to the World's Fair.",
           'When was the Eiffel Tower completed?', '1889')
INSTRUCTION = 'Answer with a short phrase only.'


@dataclasses.dataclass
class Backbone:
  model: Transformer
  params: Any
  model_state: Any
  tokenizer: Any
  source: str

  @property
  def chat(self) -> bool:
    return bool(getattr(self.tokenizer, 'chat_template', None))


def _random_backbone(spec) -> tuple[TransformerConfig, Any, Any]:
  tokenizer = CharTokenizer(RANDOM_ALPHABET)
  config = TransformerConfig.from_dict(dict(
      vocab_size=tokenizer.vocab_size, d_model=int(spec['d_model']),
      num_layers=int(spec['num_layers']), num_heads=int(spec['num_heads']),
      num_kv_heads=int(spec['num_heads']), d_ff=int(spec['d_ff']),
      max_len=int(spec['max_len']), mlp='swiglu'), key='backbone.random')
  model = Transformer(config)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  params = nn.meta.unbox(model.init(jax.random.key(int(spec['seed'])),
                                    jnp.zeros((1, 8), jnp.int32))['params'])
  return config, params, tokenizer


def _pretrained(source: str):
  if source.startswith('asset:'):
    source = assets.fetch(source[len('asset:'):], verbose=False)
  if source.endswith('.gguf'):
    from sleep_jax.checkpoints.gguf import load_gguf  # pylint: disable=g-import-not-at-top
    return load_gguf(source)
  if os.path.isdir(source):
    from sleep_jax.checkpoints import load_hf_checkpoint  # pylint: disable=g-import-not-at-top
    config, params = load_hf_checkpoint(source)
    tokenizer_file = os.path.join(source, 'tokenizer.json')
    if not os.path.exists(tokenizer_file):
      raise ValueError(f'backbone.source={source!r}: no tokenizer.json in the '
                       'checkpoint directory; add it (from the same model).')
    import json  # pylint: disable=g-import-not-at-top
    meta_file = os.path.join(source, 'tokenizer_config.json')
    meta = json.load(open(meta_file)) if os.path.exists(meta_file) else {}
    special = lambda k: (meta.get(k) if isinstance(meta.get(k), str)
                         else (meta.get(k) or {}).get('content'))
    tokenizer = HFTokenizer.from_file(
        tokenizer_file, bos_token=special('bos_token'),
        eos_token=special('eos_token') or '</s>',
        chat_template=meta.get('chat_template'))
    return config, params, tokenizer
  raise ValueError(f'backbone.source={source!r} is not a GGUF file, a '
                   "checkpoint directory, 'asset:NAME' or 'random'.")


def load_backbone(backbone_cfg, fast_levels: Sequence[dict],
                  slow_level: dict) -> Backbone:
  """The backbone of `backbone_cfg.source` with CMS fast levels added."""
  source = str(backbone_cfg.source)
  if source == 'random':
    config, params, tokenizer = _random_backbone(backbone_cfg.random)
  else:
    config, params, tokenizer = _pretrained(source)
  fast = [CMSLevel.from_dict(dict(lvl), key=f'fast_levels[{i}]')
          for i, lvl in enumerate(fast_levels)]
  slow = CMSLevel.from_dict(dict(slow_level), key='slow_level')
  config, params, model_state = cms.add_fast_levels(
      config, params, fast, slow, jax.random.key(0))
  return Backbone(Transformer(config), params, model_state, tokenizer, source)


# ---------------------------------------------------------------- prompts ---


def _user(question: str, context: str | None) -> str:
  return (f'{context}\n\n' if context else '') + f'{INSTRUCTION}\nQuestion: {question}'


def question_prompt(backbone: Backbone, question: str,
                    context: str | None = None) -> str:
  """The text of a question prompt; with `context`, the passage is in it."""
  ex_context, ex_question, ex_answer = EXAMPLE
  if backbone.chat:
    return backbone.tokenizer.apply_chat_template([
        {'role': 'user', 'content': _user(ex_question,
                                          ex_context if context else None)},
        {'role': 'assistant', 'content': ex_answer},
        {'role': 'user', 'content': _user(question, context)}])
  shot = _user(ex_question, ex_context if context else None)
  return f'{shot}\nAnswer: {ex_answer}\n\n{_user(question, context)}\nAnswer:'


def self_edit_prompt(backbone: Backbone, context: str) -> str:
  """What the self-edit generator continues: the passage and a request for
  its implications (SEAL's prompt)."""
  request = (f'{context}\n\nList several implications of the passage above, '
             'one per line.')
  if backbone.chat:
    return backbone.tokenizer.apply_chat_template(
        [{'role': 'user', 'content': request}])
  return request + '\n'


def encode(backbone: Backbone, text: str) -> list[int]:
  """Token ids of a prompt; BOS only where no chat template supplies the
  start of the sequence."""
  return backbone.tokenizer.encode(text, add_bos=not backbone.chat)


def pad(rows: Sequence[Sequence[int]], width: int, pad_id: int, what: str):
  """Right-padded int32 [len(rows), width] and the lengths."""
  longest = max(map(len, rows)) if rows else 0
  if longest > width:
    raise ValueError(f'{what} has {longest} tokens > {width}; raise the '
                     'width in the config or use shorter passages.')
  tokens = np.full((len(rows), width), pad_id, np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  return tokens, np.asarray([len(r) for r in rows], np.int32)


def text_rows(backbone: Backbone, texts: Sequence[str], width: int
              ) -> dict[str, np.ndarray]:
  """LM rows of texts (BOS + text, truncated to width + 1 tokens):
  {'inputs', 'targets', 'mask'} [N, width], loss on every text token."""
  tok = backbone.tokenizer
  rows = [tok.encode(t, add_bos=True)[:width + 1] for t in texts]
  inputs = np.full((len(rows), width), tok.pad_id, np.int32)
  targets = np.full((len(rows), width), tok.pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.float32)
  for i, row in enumerate(rows):
    n = len(row) - 1
    inputs[i, :n], targets[i, :n], mask[i, :n] = row[:-1], row[1:], 1.0
  return {'inputs': inputs, 'targets': targets, 'mask': mask}


# ---------------------------------------------------------------- answers ---


def _first_line(text: str) -> str:
  return text.strip().split('\n')[0].strip()


def answer(backbone: Backbone, params, model_state, prompts: Sequence[str], *,
           width: int, max_new_tokens: int, batch_size: int) -> list[str]:
  """Greedy answers (first line of each), in batches of `batch_size` rows
  padded to `width`: one compiled sampler per model whatever the number of
  questions."""
  tok = backbone.tokenizer
  rows = [encode(backbone, p) for p in prompts]
  out = []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    filler = [chunk[0]] * (batch_size - len(chunk))
    tokens, lengths = pad(chunk + filler, width, tok.pad_id, 'a question prompt')
    sample = sampling.sample(
        backbone.model, params, tokens, lengths, max_new_tokens=max_new_tokens,
        rng=jax.random.key(0), temperature=0.0, eos_id=tok.eos_id,
        pad_id=tok.pad_id, model_state=model_state)
    new, new_len = jax.device_get((sample.tokens, sample.lengths))
    out += [_first_line(tok.decode(new[i, :new_len[i]].tolist()))
            for i in range(len(chunk))]
  return out


def answer_items(backbone: Backbone, passages, width: int,
                 questions_per_passage: int) -> dict[str, np.ndarray]:
  """(closed-book question prompt, first gold answer) items per passage,
  teacher-forced: inputs / targets / answer_mask [C, Q, width]. A passage
  with fewer than Q questions repeats its own (every passage weighs the
  same in tau)."""
  tok = backbone.tokenizer
  q = questions_per_passage
  out = {'inputs': np.full((len(passages), q, width), tok.pad_id, np.int32),
         'targets': np.full((len(passages), q, width), tok.pad_id, np.int32),
         'answer_mask': np.zeros((len(passages), q, width), np.float32)}
  for c, passage in enumerate(passages):
    for j in range(q):
      item = passage.questions[j % len(passage.questions)]
      head = encode(backbone, question_prompt(backbone, item.question))
      # After a chat template's assistant header the reply starts at once.
      reply = tok.encode(item.answers[0] if backbone.chat
                         else ' ' + item.answers[0])
      full = head + reply + ([tok.eos_id] if tok.eos_id is not None else [])
      if len(full) > width + 1:
        raise ValueError(f'question {item.id} has {len(full)} tokens with its '
                         f'answer; raise the item width (now {width}).')
      n = len(full) - 1
      out['inputs'][c, j, :n] = full[:-1]
      out['targets'][c, j, :n] = full[1:]
      out['answer_mask'][c, j, len(head) - 1:n] = 1.0
  return out
