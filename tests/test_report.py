"""Tests for sleep_jax.studies.report: report.md contents and the PNG plots."""

from __future__ import annotations

import os

import matplotlib.figure
import numpy as np
import pytest
from PIL import Image

from sleep_jax.studies import report

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
  # The mean matrix of sleep, counted from 1: after cycle 3, session 1 =
  # mean(0.70, 0.66).
  assert '|  | session 1 | session 2 | session 3 |' in text
  assert '| after cycle 3 | 68.0 | 73.0 | 86.0 |' in text
  assert '| after cycle 1 | 88.0 |  |  |' in text
  assert 'cycle 0' not in text and 'session 0' not in text
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


_HEADER = ('| Method | Final ACC all (base + sessions) | Base recall | '
           'Final ACC (sessions) | BWT | Forgetting | Params | Run s | '
           'Compile s | Paper reference |')


def test_report_headline_columns(tmp_path):
  results = _results(_PER_SEED, [0, 1])
  new_keys = {
      'sleep': {'final_acc_all': 0.8123, 'final_acc_all_std': 0.0151,
                'final_base_acc': 0.9, 'final_base_acc_std': 0.005,
                'forgetting': 0.15, 'forgetting_std': 0.0},
      'finetune': {'final_acc_all': 0.3, 'final_acc_all_std': 0.02,
                   'final_base_acc': 0.1249, 'final_base_acc_std': 0.0751,
                   'forgetting': 0.615, 'forgetting_std': 0.0283},
  }
  for name, keys in new_keys.items():
    results['methods'][name].update(keys)
  results['methods']['replay_all'] = results['methods'].pop('my_new_method')
  results['methods']['replay_all'].update(
      final_acc_all=1.0, final_acc_all_std=0.0, final_base_acc=1.0,
      final_base_acc_std=0.0, forgetting=-0.004, forgetting_std=0.001)
  report.write_report(results, str(tmp_path))
  lines = (tmp_path / 'report.md').read_text().splitlines()
  assert _HEADER in lines
  # final ACC and BWT from results: sleep (75.67, -15.0), finetune (48.0,
  # -61.5), replay_all = my_new_method's (45.17, -8.5), stds with ddof=0.
  assert ('| Sleep | 81.2 ± 1.5 | 90.0 ± 0.5 | 75.7 ± 2.0 | -15.0 ± 0.0 | '
          '15.0 ± 0.0 | 1,234,567 | 42 | — | 44.3 (SQuAD CPT) |') in lines
  assert ('| Continual fine-tuning | 30.0 ± 2.0 | 12.5 ± 7.5 | 48.0 ± 0.7 | '
          '-61.5 ± 2.0 | 61.5 ± 2.8 | 1,234,567 | 42 | — | 32.0 (SQuAD CPT) |'
          ) in lines
  # -0.4 points of forgetting: printed unsigned, not as +/-0.0.
  assert ('| Fine-tuning + replay of everything (oracle buffer) | '
          '100.0 ± 0.0 | 100.0 ± 0.0 | 45.2 ± 0.5 | -8.5 ± 0.5 | -0.4 ± 0.1 | '
          '1,234,567 | 42 | — | — |') in lines
  text = '\n'.join(lines)
  assert '*Final ACC all*' in text and 'weighted by items' in text
  assert 'Chaudhry et al. 2018' in text
  # The bar chart plots the new scores when every method has them.
  assert report._plot_scores(results['methods'], 'final_acc_all',
                             'final_acc')[0] == 'final_acc_all'
  _check_pngs(tmp_path, ['sleep', 'finetune', 'replay_all'])


def test_report_old_results_without_new_keys(tmp_path):
  # results.json from before final_acc_all / final_base_acc / forgetting.
  # Session 0 of seed 0 peaks after cycle 1, not on the diagonal.
  matrices = [[[0.4], [0.9, 0.8], [0.5, 0.6, 0.7]],
              [[0.6], [0.7, 0.8], [0.5, 0.7, 0.9]]]
  results = _results({'replay': matrices}, [0, 1])
  method = results['methods']['replay']
  method['base_acc'] = 0.75
  for run, base in zip(method['per_seed'], (0.8, 0.7)):
    run['base_acc'] = base
  assert not {'final_acc_all', 'final_base_acc', 'forgetting'} & set(method)
  report.write_report(results, str(tmp_path))
  lines = (tmp_path / 'report.md').read_text().splitlines()
  assert _HEADER in lines
  # Final ACC: seed 0 (0.5 + 0.6 + 0.7) / 3 = 0.6, seed 1 (0.5 + 0.7 + 0.9)
  # / 3 = 0.7: 65.0 ± 5.0 (std ddof=0 as _results wrote it).
  # BWT: seed 0 ((0.5 - 0.4) + (0.6 - 0.8)) / 2 = -0.05, seed 1
  # ((0.5 - 0.6) + (0.7 - 0.8)) / 2 = -0.1: -7.5 ± 2.5.
  # Base recall from base_acc: 75.0; std over seeds, ddof=1:
  # |0.8 - 0.7| / sqrt(2) = 0.0707 -> 7.1.
  # Forgetting, per seed: seed 0 (max(0.4, 0.9) - 0.5 + 0.8 - 0.6) / 2 = 0.3,
  # seed 1 (max(0.6, 0.7) - 0.5 + 0.8 - 0.7) / 2 = 0.15: mean 0.225, std
  # ddof=1 0.15 / sqrt(2) = 0.106. Final ACC all needs item counts: a dash.
  assert ('| Fine-tuning + replay | — | 75.0 ± 7.1 | 65.0 ± 5.0 | '
          '-7.5 ± 2.5 | 22.5 ± 10.6 | 1,234,567 | 42 | — | — |') in lines
  assert report._plot_scores(results['methods'], 'final_acc_all',
                             'final_acc')[0] == 'final_acc'
  _check_pngs(tmp_path, ['replay'])


def test_report_matrix_only_shows_dashes(tmp_path):
  results = {'methods': {'finetune_anchor': {
      'acc_matrix': [[0.5, None], [0.3, 0.7]]}}}
  report.write_report(results, str(tmp_path))
  lines = (tmp_path / 'report.md').read_text().splitlines()
  # ACC (0.3 + 0.7) / 2 = 0.5, BWT 0.3 - 0.5 = -0.2, forgetting 0.5 - 0.3.
  assert ('| Continual fine-tuning + anchor (LwF-style) | — | — | '
          '50.0 ± 0.0 | -20.0 ± 0.0 | 20.0 ± 0.0 | — | — | — | — |') in lines
  assert 'after each stage' not in '\n'.join(lines)


def test_report_stage_table(tmp_path):
  results = _results({'sleep': _PER_SEED['sleep'],
                      'finetune': _PER_SEED['finetune']}, [0, 1])
  stages = [  # [seed][cycle]; seed 1 skipped dreaming in cycle 1
      [{'wake': {'session': 0.95, 'base': 0.60},
        'consolidation': {'session': 0.90, 'base': 0.70},
        'dreaming': {'session': 0.92, 'base': 0.72}},
       {'wake': {'session': 0.97, 'base': 0.50},
        'consolidation': {'session': 0.80, 'base': 0.66},
        'dreaming': {'session': 0.85, 'base': 0.68}},
       {'wake': {'session': 0.99, 'base': 0.40},
        'consolidation': {'session': 0.86, 'base': 0.64}}],
      [{'wake': {'session': 0.85, 'base': 0.50},
        'consolidation': {'session': 0.80, 'base': 0.60},
        'dreaming': {'session': 0.84, 'base': 0.62}},
       {'wake': {'session': 0.93, 'base': 0.40},
        'consolidation': {'session': 0.82, 'base': 0.64}},
       {'wake': {'session': 0.91, 'base': 0.30},
        'consolidation': {'session': 0.84, 'base': 0.60}}]]
  for run, cycles in zip(results['methods']['sleep']['per_seed'], stages):
    run['cycles'] = [{'base_acc': 0.5, 'stages': s} for s in cycles]
  # Fine-tuning records no stage: no table for it.
  for run in results['methods']['finetune']['per_seed']:
    run['cycles'] = [{'base_acc': 0.5, 'stages': {}}] * 3
  report.write_report(results, str(tmp_path))
  text = (tmp_path / 'report.md').read_text()
  lines = text.splitlines()
  assert text.count('after each stage') == 1
  assert ('| Cycle | wake session | wake base | consolidation session | '
          'consolidation base | dreaming session | dreaming base |') in lines
  # Cycle 1: wake (0.95 + 0.85) / 2 = 0.90, (0.60 + 0.50) / 2 = 0.55;
  # consolidation 0.85, 0.65; dreaming (0.92 + 0.84) / 2 = 0.88, 0.67.
  assert '| 1 | 90.0 | 55.0 | 85.0 | 65.0 | 88.0 | 67.0 |' in lines
  # Cycle 2: dreaming from seed 0 alone.
  assert '| 2 | 95.0 | 45.0 | 81.0 | 65.0 | 85.0 | 68.0 |' in lines
  # Cycle 3: no seed dreamt.
  assert '| 3 | 95.0 | 35.0 | 85.0 | 62.0 |  |  |' in lines
  # The table follows Sleep's accuracy matrix, before fine-tuning's.
  assert (text.index('## Sleep') < text.index('| Cycle |')
          < text.index('## Continual fine-tuning'))


@pytest.fixture
def saved_figures(monkeypatch):
  """What each plot shows, by file name: per axes its tick labels, limits,
  lines, bars and images, read as the figure is saved."""
  figures = {}
  savefig = matplotlib.figure.Figure.savefig

  def spy(fig, path, **kwargs):
    fig.canvas.draw()  # lays out the tick labels
    figures[os.path.basename(path)] = [{
        'xticklabels': [t.get_text() for t in ax.get_xticklabels()],
        'yticklabels': [t.get_text() for t in ax.get_yticklabels()],
        'ylim': ax.get_ylim(), 'ylabel': ax.get_ylabel(),
        'lines': [(list(line.get_xdata()), list(line.get_ydata()),
                   line.get_label()) for line in ax.get_lines()],
        'bars': [patch.get_height() for patch in ax.patches],
        'clims': [image.get_clim() for image in ax.get_images()],
        'images': [np.ma.filled(image.get_array(), np.nan)
                   for image in ax.get_images()],
    } for ax in fig.axes]
    return savefig(fig, path, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', spy)
  return figures


def test_report_every_number_in_percent(tmp_path, saved_figures):
  results = _results(
      {'sleep': _PER_SEED['sleep']}, [0, 1], base={'acc': 0.123},
      chance=0.05, tuning={'sleep': {'1e-4': 0.81}})
  report.write_report(results, str(tmp_path))
  text = (tmp_path / 'report.md').read_text()
  # The unit is stated once, in the caption, not per table or heading.
  assert text.count('Every accuracy and score in this report is in percent'
                    ) == 1
  assert 'percentage points' in text and 'in points' not in text
  assert not [line for line in text.splitlines()
              if '%' in line and (line.startswith(('|', '#')))]
  assert 'Base model accuracy on the base population: 12.3%' in text
  assert 'Chance accuracy: 5.0%.' in text
  assert '| Learning-rate sweep' not in text and '| Sleep | 81.0 |' in text
  # The plots too: sleep's mean matrix after cycle 3, session 1 is 68.0.
  heatmap = saved_figures['acc_matrix_sleep.png'][0]
  assert heatmap['clims'] == [(0.0, 100.0)]
  np.testing.assert_allclose(heatmap['images'][0][2], [68.0, 73.0, 86.0])
  curves = saved_figures['forgetting_sleep.png'][0]
  assert curves['ylim'] == (0.0, 100.0)
  np.testing.assert_allclose(curves['lines'][0][1], [88.0, 79.0, 68.0])
  acc, drop = saved_figures['methods.png'][:2]
  assert acc['ylim'] == (0.0, 100.0)
  # Final ACC of sleep (75.67), chance at 5%; forgetting 15.0 points.
  np.testing.assert_allclose(acc['bars'], [100 * np.mean(
      [_scores(m)[0] for m in _PER_SEED['sleep']])])
  assert [line[1] for line in acc['lines'] if line[2] == 'chance'] == [
      [5.0, 5.0]]
  np.testing.assert_allclose(drop['bars'], [15.0])


def test_report_counts_cycles_from_one(tmp_path, saved_figures):
  results = _results({'sleep': _PER_SEED['sleep']}, [0, 1])
  report.write_report(results, str(tmp_path))
  text = (tmp_path / 'report.md').read_text()
  assert 'acc[i][j] = recall on session j after cycle i' in text
  assert 'mean over j < T of acc[T][j] - acc[j][j]' in text
  assert 'max over i in [j, T-1] of acc[i][j], minus acc[T][j]' in text
  assert 'acc[T-1]' not in text and 'T-2' not in text
  heatmap = saved_figures['acc_matrix_sleep.png'][0]
  assert heatmap['xticklabels'] == ['1', '2', '3']
  assert heatmap['yticklabels'] == ['1', '2', '3']
  curves = saved_figures['forgetting_sleep.png'][0]
  # Session j is learnt by cycle j: its curve starts there.
  assert [(x, label) for x, _, label in curves['lines']] == [
      ([1, 2, 3], 'session 1'), ([2, 3], 'session 2'), ([3], 'session 3')]
  assert curves['xticklabels'] == ['1', '2', '3']


def test_report_removes_stale_plots(tmp_path):
  report.write_report(_results(_PER_SEED, [0, 1]), str(tmp_path))
  notes = tmp_path / 'plots' / 'notes.txt'
  notes.write_text('not a plot')
  written = report.write_report(
      _results({'sleep': _PER_SEED['sleep']}, [0, 1]), str(tmp_path))
  # Only what this report shows; a file not a plot is left alone.
  assert notes.exists()
  notes.unlink()
  _check_pngs(tmp_path, ['sleep'])
  assert sorted(os.path.join(tmp_path, 'plots', p)
                for p in os.listdir(tmp_path / 'plots')) == sorted(
                    p for p in written if p.endswith('.png'))
  report.write_report({'methods': {}}, str(tmp_path))
  assert os.listdir(tmp_path / 'plots') == []


def test_report_marks_smoke_runs(tmp_path):
  results = _results({'sleep': _PER_SEED['sleep']}, [0, 1])
  results['config']['smoke'] = True
  report.write_report(results, str(tmp_path))
  lines = (tmp_path / 'report.md').read_text().splitlines()
  assert lines[0] == '# Continual-learning report' and lines[1] == ''
  assert lines[2].startswith('**Smoke configuration') and lines[2].endswith(
      '**'), lines[2]
  assert 'end to end' in lines[2] and 'nothing about the method' in lines[2]
  results['config']['smoke'] = False
  report.write_report(results, str(tmp_path))
  assert 'Smoke' not in (tmp_path / 'report.md').read_text()


def test_report_incomplete_run(tmp_path):
  per_seed = {'sleep': _PER_SEED['sleep'], 'finetune': _PER_SEED['finetune']}
  results = _results(per_seed, [0, 1], finished=False,
                     complete=[['sleep', 0], ['sleep', 1], ['finetune', 0]])
  # Fine-tuning's seed 1 was cut short: its entry holds seed 0 alone.
  results['methods']['finetune'] = _results(
      {'finetune': per_seed['finetune'][:1]}, [0])['methods']['finetune']
  report.write_report(results, str(tmp_path))
  text = (tmp_path / 'report.md').read_text()
  lines = text.splitlines()
  assert lines[2].startswith('**Incomplete run**'), lines[2]
  assert lines[2].endswith('Complete (method, seed) runs: Sleep (seeds 0, 1); '
                           'Continual fine-tuning (seed 0).'), lines[2]
  assert lines[4].startswith('Seeds: 0, 1;')
  # The method with fewer seeds says which, in its own section only.
  own = 'Seeds of this method: 0 (the run: 0, 1).'
  assert text.count(own) == 1
  assert (text.index('## Continual fine-tuning') < text.index(own)
          < text.index('| after cycle 1 |', text.index('## Continual')))
  results.update(finished=False, complete=[])
  report.write_report(results, str(tmp_path))
  assert 'Complete (method, seed) runs: none.' in (
      tmp_path / 'report.md').read_text()
  # A finished run, or a file from before these keys: no warning.
  for finished in (True, None):
    results['finished'] = finished
    report.write_report(results, str(tmp_path))
    assert 'Incomplete' not in (tmp_path / 'report.md').read_text()


def test_report_compile_time_apart(tmp_path):
  results = _results({'sleep': _PER_SEED['sleep'],
                      'finetune': _PER_SEED['finetune']}, [0, 1])
  results['methods']['sleep'].update(seconds=100.4, compile_seconds=30.2)
  report.write_report(results, str(tmp_path))
  text = (tmp_path / 'report.md').read_text()
  lines = text.splitlines()
  assert _HEADER in lines
  sleep = next(line for line in lines if line.startswith('| Sleep |'))
  assert sleep.endswith('| 1,234,567 | 70 | 30 | 44.3 (SQuAD CPT) |'), sleep
  # No compile time recorded: all the wall time under Run s, as before.
  finetune = next(line for line in lines
                  if line.startswith('| Continual fine-tuning |'))
  assert finetune.endswith('| 1,234,567 | 42 | — | 32.0 (SQuAD CPT) |')
  assert '*Run s*: wall time summed over seeds, without compilation' in text
  assert '*Compile s*' in text
