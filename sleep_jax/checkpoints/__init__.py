"""Checkpoints: Orbax train-state checkpoints and pretrained-weight import."""

from sleep_jax.checkpoints.hf import CheckpointError, load_hf_checkpoint
from sleep_jax.checkpoints.manager import Checkpointer, abstract_like

__all__ = ['CheckpointError', 'Checkpointer', 'abstract_like',
           'load_hf_checkpoint']
