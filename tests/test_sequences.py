"""Prompt + completion sequences (sleep_jax.sequences)."""

import jax.numpy as jnp
import numpy as np

from sleep_jax import sequences


def test_join_places_completion_after_prompt_and_masks_its_logits():
  prompt = jnp.array([[5, 6, 7, 0], [5, 0, 0, 0]])
  completion = jnp.array([[8, 9, 0], [3, 4, 2]])
  tokens, mask = sequences.join(prompt, jnp.array([3, 1]), completion,
                                jnp.array([2, 3]))
  np.testing.assert_array_equal(tokens, [[5, 6, 7, 8, 9, 0, 0],
                                         [5, 3, 4, 2, 0, 0, 0]])
  # logits at t predict token t + 1: positions 2, 3 predict 8, 9.
  np.testing.assert_array_equal(mask, [[0, 0, 1, 1, 0, 0, 0],
                                       [1, 1, 1, 0, 0, 0, 0]])
