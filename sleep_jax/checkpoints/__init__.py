"""Checkpoints: Orbax train-state checkpoints and pretrained-weight import."""

from sleep_jax.checkpoints.hf import CheckpointError, load_hf_checkpoint
from sleep_jax.checkpoints.manager import Checkpointer

__all__ = ['CheckpointError', 'Checkpointer', 'load_hf_checkpoint']
