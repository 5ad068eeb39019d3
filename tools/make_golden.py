r"""Writes tiny random HF checkpoints and their reference logits (the golden
files under tests/testdata/hf_*), using PyTorch + transformers as the
reference implementation.

    pip install -e '.[golden]'
    python tools/make_golden.py            # rewrites tests/testdata/hf_*

Three checkpoints, each a few tens of KB:
  hf_llama  LlamaForCausalLM, GQA (4 q / 2 kv heads), rope scaling "llama3",
            untied embeddings; config.json rewritten in the *published*
            layout (rope_theta + rope_scaling), as on the Hub.
  hf_qwen2  Qwen2ForCausalLM, qkv bias, tied embeddings; config.json as
            transformers 5 writes it (rope_parameters).
  hf_qwen3  Qwen3ForCausalLM, per-head q/k RMSNorm, head_dim != d/heads,
            sharded into two files with model.safetensors.index.json.
golden.npz holds a right-padded batch (tokens, lengths) and the reference
float32 logits.
"""

import json
import os

import numpy as np
import torch
import transformers

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   'tests', 'testdata')
COMMON = dict(vocab_size=64, hidden_size=16, intermediate_size=32,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, rms_norm_eps=1e-5,
              # Large init so logits are O(1): small errors must show.
              initializer_range=0.3)
TOKENS = np.array([[5, 17, 33, 2, 60, 61, 7, 44],
                   [9, 51, 3, 28, 0, 0, 0, 0]], np.int64)
LENGTHS = np.array([8, 4], np.int64)


def _perturb_norms(model):
  # Norm weights start at 1; randomise them so a swapped or missing norm
  # shows up in the logits.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith('bias'):
        p.copy_(0.3 * torch.randn_like(p))


def _save(model, name, max_shard_size=None):
  path = os.path.join(OUT, name)
  os.makedirs(path, exist_ok=True)
  for f in os.listdir(path):
    os.remove(os.path.join(path, f))
  kwargs = {'max_shard_size': max_shard_size} if max_shard_size else {}
  model.save_pretrained(path, safe_serialization=True, **kwargs)
  for extra in ('generation_config.json',):
    if os.path.exists(os.path.join(path, extra)):
      os.remove(os.path.join(path, extra))
  mask = (np.arange(TOKENS.shape[1])[None] < LENGTHS[:, None]).astype(np.int64)
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(TOKENS),
                   attention_mask=torch.tensor(mask)).logits.float().numpy()
  np.savez_compressed(os.path.join(path, 'golden.npz'), tokens=TOKENS,
                      lengths=LENGTHS, logits=logits.astype(np.float32))
  return path


def _to_published_layout(path):
  """Rewrites config.json with rope_theta + rope_scaling (the Hub's layout)."""
  cfg_path = os.path.join(path, 'config.json')
  with open(cfg_path) as f:
    cfg = json.load(f)
  rope = cfg.pop('rope_parameters')
  cfg['rope_theta'] = rope.pop('rope_theta')
  cfg['rope_scaling'] = rope
  with open(cfg_path, 'w') as f:
    json.dump(cfg, f, indent=2)


def main():
  torch.manual_seed(0)
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      **COMMON, tie_word_embeddings=False, attention_bias=False,
      rope_parameters=dict(rope_type='llama3', rope_theta=50_000.0, factor=8.0,
                           low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=16)))
  _perturb_norms(llama)
  _to_published_layout(_save(llama.eval(), 'hf_llama'))

  qwen2 = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      **COMMON, tie_word_embeddings=True,
      rope_parameters=dict(rope_type='default', rope_theta=1_000_000.0)))
  _perturb_norms(qwen2)
  _save(qwen2.eval(), 'hf_qwen2')

  qwen3 = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
      **COMMON, head_dim=8, tie_word_embeddings=False,
      rope_parameters=dict(rope_type='default', rope_theta=1_000_000.0)))
  _perturb_norms(qwen3)
  _save(qwen3.eval(), 'hf_qwen3', max_shard_size='12KB')
  for name in ('hf_llama', 'hf_qwen2', 'hf_qwen3'):
    files = os.listdir(os.path.join(OUT, name))
    size = sum(os.path.getsize(os.path.join(OUT, name, f)) for f in files)
    print(f'{name}: {sorted(files)} {size / 1024:.0f} KB')


if __name__ == '__main__':
  main()
