"""Checkpoints: Orbax train-state checkpoints (and, later, weight imports)."""

from sleep_jax.checkpoints.manager import Checkpointer, abstract_like

__all__ = ['Checkpointer', 'abstract_like']
