"""sleep_jax: the "Sleep" paradigm for continual learning (arXiv 2606.03979)."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (_HERE / 'requirements.txt').read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith('#')]


setuptools.setup(
    name='sleep_jax',
    version='0.1.0',
    description=('Language models that sleep: CMS memory levels, knowledge '
                 'seeding and dreaming in JAX (arXiv 2606.03979).'),
    long_description=(_HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=setuptools.find_packages(
        include=['sleep_jax', 'sleep_jax.*', 'experiments', 'experiments.*',
                 'benchmarks', 'benchmarks.*', 'launch']),
    install_requires=_requirements(),
    extras_require={
        'test': ['pytest==9.2.0', 'pytest-xdist==3.8.0'],
        # tools/make_golden.py: the reference implementation for golden files.
        'golden': ['torch==2.13.0', 'transformers==5.23.0'],
        # benchmarks/peers.py: the PyTorch side of the side-by-side timing.
        'peers': ['torch==2.13.0', 'transformers==5.23.0',
                  'accelerate==1.15.0'],
    },
)
