"""sleep_jax: the "Sleep" paradigm for continual learning of LMs, in JAX.

Implements arXiv 2606.03979 ("Language Models Need Sleep: Learning to
Self-Modify and Consolidate Memories").
"""

__version__ = '0.1.0'
