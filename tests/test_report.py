"""Tests for sleep_jax.report: report.md contents and the PNG plots."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from sleep_jax import report

# Per-seed lower-triangular accuracy matrices: 2 seeds x 3 sessions.
_PER_SEED = {
    'sleep': [[[0.90], [0.80, 0.85], [0.70, 0.75, 0.88]],
              [[0.86], [0.78, 0.81], [0.66, 0.71, 0.84]]],
    'finetune': [[[0.92], [0.40, 0.90], [0.20, 0.35, 0.91]],
                 [[0.88], [0.45, 0.86], [0.25, 0.30, 0.87]]],
    'my_new_method': [[[0.50], [0.45, 0.52], [0.40, 0.44, 0.50]],
                      [[0.48], [0.47, 0.50], [0.42, 0.40, 0.55]]],
}


def _scores(matrix):
  """(final ACC, BWT) of one lower-triangular matrix, computed here by hand."""
  last = np.array(matrix[-1])
  diagonal = np.array([matrix[j][j] for j in range(len(matrix))])
  bwt = float(np.mean(last[:-1] - diagonal[:-1])) if len(matrix) > 1 else 0.0
  return float(last.mean()), bwt


def _results(per_seed_matrices: dict, seeds: list[int], **extra) -> dict:
  methods = {}
  for name, matrices in per_seed_matrices.items():
    t = len(matrices[0])
    mean = np.mean([[row + [np.nan] * (t - len(row)) for row in m]
                    for m in matrices], axis=0)
    mean_matrix = [[None if np.isnan(a) else float(a) for a in row]
                   for row in mean]
    scores = np.array([_scores(m) for m in matrices])
    methods[name] = {
        'acc_matrix': mean_matrix,
        'final_acc': float(scores[:, 0].mean()),
        'final_acc_std': float(scores[:, 0].std()),
        'bwt': float(scores[:, 1].mean()),
        'bwt_std': float(scores[:, 1].std()),
        'params': 1234567, 'seconds': 42.4,
        'per_seed': [{'seed': s, 'acc_matrix': m, 'final_acc': a, 'bwt': b}
                     for s, m, (a, b) in zip(seeds, matrices, scores)],
    }
  return {'methods': methods, 'seeds': seeds, 'config': {'lr': 1e-4}, **extra}


def _check_pngs(workdir, names):
  pngs = sorted(os.listdir(os.path.join(workdir, 'plots')))
  expected = sorted([f'acc_matrix_{n}.png' for n in names] +
                    [f'forgetting_{n}.png' for n in names] + ['methods.png'])
  assert pngs == expected
  for png in pngs:
    with Image.open(os.path.join(workdir, 'plots', png)) as image:
      width, height = image.size
    assert width > 200 and height > 150, (png, image.size)


def test_report_three_sessions_two_seeds(tmp_path):
  results = _results(
      _PER_SEED, [0, 1], base={'acc': 0.123, 'seconds': 5.0}, chance=0.05,
      tuning={'sleep': {'1e-4': 0.81, '3e-4': 0.77},
              'finetune': {'1e-4': 0.50}})
  # Hand-computed mean matrix: above the diagonal is None.
  assert results['methods']['sleep']['acc_matrix'][0][1] is None
  written = report.write_report(results, str(tmp_path))

  report_path = tmp_path / 'report.md'
  assert str(report_path) in written
  assert all(os.path.exists(p) for p in written)
  assert len(written) == 1 + 2 * len(_PER_SEED) + 1
  text = report_path.read_text()
  lines = text.splitlines()
  for name, matrices in _PER_SEED.items():
    scores = np.array([_scores(m) for m in matrices])
    acc = f'{100 * scores[:, 0].mean():.1f} ± {100 * scores[:, 0].std():.1f}'
    bwt = f'{100 * scores[:, 1].mean():+.1f} ± {100 * scores[:, 1].std():.1f}'
    label = report.METHOD_LABELS.get(name, name)
    row = [line for line in lines if line.startswith(f'| {label} |')]
    assert row, (name, text)
    assert acc in row[0] and bwt in row[0], row[0]
    assert '1,234,567' in row[0] and '| 42 |' in row[0]
    assert f'plots/acc_matrix_{name}.png' in text
    assert f'plots/forgetting_{name}.png' in text
  sleep_row = next(line for line in lines if line.startswith('| Sleep |'))
  assert '44.3' in sleep_row
  unknown_row = next(line for line in lines
                     if line.startswith('| my_new_method |'))
  assert '—' in unknown_row
  assert 'plots/methods.png' in text
  assert '12.3' in text  # base accuracy
  assert 'Chance accuracy: 5.0%' in text
  assert 'lr 3e-4' in text and '81.0' in text
  # The mean matrix of sleep: after cycle 2, session 0 = mean(0.70, 0.66).
  assert '| after cycle 2 | 68.0 | 73.0 | 86.0 |' in text
  assert '| after cycle 0 | 88.0 |  |  |' in text
  _check_pngs(tmp_path, _PER_SEED)


def test_report_one_session_one_seed(tmp_path):
  per_seed = {'sleep': [[[0.6]]], 'seal': [[[0.4]]]}
  results = _results(per_seed, [7])
  written = report.write_report(results, str(tmp_path))
  assert all(os.path.exists(p) for p in written)
  text = (tmp_path / 'report.md').read_text()
  assert '60.0 ± 0.0' in text and '+0.0 ± 0.0' in text
  assert '43.2 (SQuAD CPT)' in text  # seal's paper reference
  assert 'Chance' not in text and 'Learning-rate' not in text
  _check_pngs(tmp_path, per_seed)


def test_report_without_optional_fields(tmp_path):
  # Only the matrix: scores fall back to sleep_jax.eval, the rest to dashes.
  results = {'methods': {'replay': {'acc_matrix': [[0.5, None], [0.3, 0.7]]}}}
  report.write_report(results, str(tmp_path))
  text = (tmp_path / 'report.md').read_text()
  assert '50.0 ± 0.0' in text and '-20.0 ± 0.0' in text
  _check_pngs(tmp_path, ['replay'])
