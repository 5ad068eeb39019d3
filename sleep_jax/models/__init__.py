"""Models: the llama/qwen-family transformer and its config."""

from sleep_jax.models.config import RopeScaling, TransformerConfig
from sleep_jax.models.transformer import Transformer, count_params, init_cache

__all__ = ['RopeScaling', 'Transformer', 'TransformerConfig', 'count_params',
           'init_cache']
