"""Models: the llama/qwen-family transformer, its config and CMS levels."""

from sleep_jax.models.config import CMSLevel, RopeScaling, TransformerConfig
from sleep_jax.models.transformer import (Transformer, count_params,
                                          init_cache, variables)

__all__ = ['CMSLevel', 'RopeScaling', 'Transformer', 'TransformerConfig',
           'count_params', 'init_cache', 'variables']
