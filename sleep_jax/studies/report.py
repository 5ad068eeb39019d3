"""Human-readable report of a continual-learning experiment.

The results it reads follow docs/design.md §8.

`write_report(results, workdir)` turns the `results` dict of an experiment
into <workdir>/report.md (a headline table, per-method accuracy matrices and,
where the cycles recorded them, per-stage recalls, the optional
learning-rate sweep) and PNG plots under <workdir>/plots/: one
accuracy-matrix heatmap and one forgetting-curve plot per method, and one
bar chart comparing the methods' final ACC over everything (else over the
sessions) and forgetting (else BWT).

Every accuracy and score is in percent, and cycles and sessions are counted
from 1 as the run's log counts them. plots/ holds only the plots this report shows.

Older results.json files, without the headline keys final_acc_all,
final_base_acc and forgetting, or without 'complete', 'finished' and
compile_seconds, still render: what the accuracy matrices give is computed
here, the rest is shown as a dash.

`plot_dreaming(results, path)` draws the dreaming study's results.json
(sleep_jax.studies.dreaming): rewarded dreams per ReST-EM round, and recall of
the new and the base facts before and after, per run.
"""

from __future__ import annotations

import os
import re

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sleep_jax import eval as cl_eval  # noqa: E402

METHOD_LABELS = {
    'sleep': 'Sleep',
    'sleep_no_expansion': 'Sleep w/o expansion',
    'sleep_no_lti': 'Sleep w/o LTI (alpha=1)',
    'sleep_no_dreaming': 'Sleep w/o dreaming',
    'no_consolidation': 'No consolidation',
    'finetune': 'Continual fine-tuning',
    'lora_finetune': 'Continual LoRA fine-tuning',
    'replay': 'Fine-tuning + replay',
    'replay_all': 'Fine-tuning + replay of everything (oracle buffer)',
    'finetune_anchor': 'Continual fine-tuning + anchor (LwF-style)',
    'finetune_compute': "Continual fine-tuning, Sleep's compute",
    'sleep_no_anchor': 'Sleep w/o anchor',
    'ewc': 'EWC',
    'seal': 'SEAL-style dreaming (no consolidation)',
}

# arXiv 2606.03979, SQuAD knowledge incorporation, continued-pretraining
# regime (n=200 passages), no-context accuracy in %. Keys are our method
# names; 'base' is the base model before any incorporation.
PAPER_SQUAD_CPT = {
    'sleep': 44.3,
    'sleep_no_dreaming': 36.2,
    'seal': 43.2,
    'finetune': 32.0,
    'base': 31.9,
}

_DASH = '—'
_DPI = 100

# Headline scores: (results.json key, older key holding the same quantity,
# function of one accuracy matrix that recomputes it, or None). base_acc of
# older files is already the base recall after the last cycle.
_SCORES = {
    'final_acc_all': (None, None),
    'final_base_acc': ('base_acc', None),
    'final_acc': (None, cl_eval.final_acc),
    'bwt': (None, cl_eval.bwt),
    'forgetting': (None, cl_eval.forgetting),
}
# Stages a cycle may record, in the order they run; others follow, sorted.
_STAGE_ORDER = ('wake', 'consolidation', 'dreaming')


def method_label(name: str) -> str:
  """The human label of a method; unknown names are shown as they are."""
  return METHOD_LABELS.get(name, name)


def write_report(results: dict, workdir: str) -> list[str]:
  """Writes <workdir>/report.md and <workdir>/plots/*.png; returns the
  paths written."""
  methods = results.get('methods') or {}
  plots_dir = os.path.join(workdir, 'plots')
  os.makedirs(plots_dir, exist_ok=True)
  plots = {}  # method name -> (heatmap, forgetting curves), relative to workdir
  for name, method in methods.items():
    stem = re.sub(r'[^A-Za-z0-9_.-]', '_', name)
    plots[name] = (f'plots/acc_matrix_{stem}.png',
                   f'plots/forgetting_{stem}.png')
    _plot_acc_matrix(_matrix_array(method['acc_matrix']), method_label(name),
                     os.path.join(workdir, plots[name][0]))
    _plot_forgetting(method['acc_matrix'], method_label(name),
                     os.path.join(workdir, plots[name][1]))
  comparison = 'plots/methods.png' if methods else None
  if comparison:
    _plot_methods(methods, results.get('chance'),
                  os.path.join(workdir, comparison))
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write(_report_markdown(results, plots, comparison))
  written = ['report.md'] + [p for pair in plots.values() for p in pair]
  written += [comparison] if comparison else []
  # Plots of methods this results.json no longer holds would read as part
  # of this report.
  shown = {os.path.basename(p) for p in written if p.startswith('plots/')}
  for name in os.listdir(plots_dir):
    if name.endswith('.png') and name not in shown:
      os.remove(os.path.join(plots_dir, name))
  return [os.path.join(workdir, p) for p in written]


# ------------------------------------------------------------- formatting ---


def _percent(value) -> str:
  """Accuracy as a percentage with one decimal; blank for None or NaN."""
  if value is None or np.isnan(value):
    return ''
  return f'{100 * value:.1f}'


def _percent_pm(mean: float, std: float, signed: bool = False) -> str:
  # round before formatting so that a tiny negative prints as +0.0, not -0.0
  mean_pct = round(100 * mean, 1) + 0.0
  mean_text = f'{mean_pct:+.1f}' if signed else f'{mean_pct:.1f}'
  return f'{mean_text} ± {100 * std:.1f}'


def _matrix_array(acc_matrix) -> np.ndarray:
  """The accuracy matrix as a T x T' float array, NaN for None or missing."""
  width = max((len(row) for row in acc_matrix), default=0)
  return np.array([[np.nan if a is None else float(a) for a in row] +
                   [np.nan] * (width - len(row)) for row in acc_matrix],
                  dtype=float).reshape(len(acc_matrix), width)


def _seconds(value) -> str:
  return _DASH if value is None else f'{round(value):d}'


def _seed_list(seeds) -> str:
  return ', '.join(str(s) for s in seeds) or 'none'


def _sample_std(values) -> float:
  """Sample standard deviation (ddof=1), 0 for a single value."""
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _score(method: dict, key: str):
  """(mean, std) over seeds of one headline score, or None if unknown.

  Taken from `key` (and `<key>_std`) when results.json has it; else from
  the older key of the same quantity; else recomputed per seed from the
  per-seed matrices (sample std); else from the mean matrix (std 0)."""
  old_key, from_matrix = _SCORES[key]
  for name in (key, old_key):
    if name and method.get(name) is not None:
      std = method.get(f'{name}_std')
      if std is None:
        seeds = [r[name] for r in method.get('per_seed') or []
                 if r.get(name) is not None]
        std = _sample_std(seeds)
      return float(method[name]), float(std)
  if from_matrix is None:
    return None
  per_seed = method.get('per_seed') or []
  if per_seed and all(r.get('acc_matrix') for r in per_seed):
    values = [from_matrix(r['acc_matrix']) for r in per_seed]
    return float(np.mean(values)), _sample_std(values)
  return from_matrix(method['acc_matrix']), 0.0


def _score_text(score, signed: bool = False) -> str:
  return _DASH if score is None else _percent_pm(*score, signed=signed)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join(['---'] * len(header)) + '|']
  return lines + ['| ' + ' | '.join(row) + ' |' for row in rows]


def _report_markdown(results: dict, plots: dict, comparison) -> str:
  methods = results.get('methods') or {}
  seeds = results.get('seeds') or []
  sessions = len(next(iter(methods.values()))['acc_matrix']) if methods else 0
  lines = ['# Continual-learning report', '']
  if (results.get('config') or {}).get('smoke'):
    lines += ['**Smoke configuration: these numbers come from a tiny model '
              'and world that only check the code runs end to end; they mean '
              'nothing about the method.**', '']
  if results.get('finished') is False:
    lines += [_incomplete_text(results.get('complete')), '']
  lines += [f'Seeds: {_seed_list(seeds)}; {sessions} session(s). Accuracies '
            'are closed-book recall on the people of each session, averaged '
            'over seeds.', '']

  rows = []
  for name, method in methods.items():
    params, paper = method.get('params'), PAPER_SQUAD_CPT.get(name)
    seconds, compile_s = method.get('seconds'), method.get('compile_seconds')
    run_s = (seconds if seconds is None or compile_s is None
             else seconds - compile_s)
    rows.append([method_label(name)] +
                [_score_text(_score(method, key), signed=key == 'bwt')
                 for key in _SCORES] +
                [_DASH if params is None else f'{int(params):,}',
                 _seconds(run_s), _seconds(compile_s),
                 _DASH if paper is None else f'{paper:.1f} (SQuAD CPT)'])
  lines += _markdown_table(['Method', 'Final ACC all (base + sessions)',
                            'Base recall', 'Final ACC (sessions)', 'BWT',
                            'Forgetting', 'Params', 'Run s', 'Compile s',
                            'Paper reference'], rows)
  lines += ['', 'Every accuracy and score in this report is in percent: '
            'accuracies in %, BWT and forgetting in percentage points (BWT '
            'signed). Scores are mean ± sample std over seeds after the last '
            'cycle. Cycles and sessions are counted from 1, as the log counts '
            'them: T cycles, cycle i learns session i, and acc[i][j] = recall '
            'on session j after cycle i. *Final ACC all*: recall over all '
            'knowledge, the base population and every session pooled, '
            'weighted by items (total correct / total items). *Base recall*: '
            'recall on the base population. *Final ACC (sessions)*: '
            'unweighted mean of acc[T][j] over the sessions. *BWT*: mean over '
            'j < T of acc[T][j] - acc[j][j] (Lopez-Paz & Ranzato 2017; '
            'negative = forgetting). *Forgetting*: mean over j < T of max '
            'over i in [j, T-1] of acc[i][j], minus acc[T][j] (Chaudhry et '
            'al. 2018; positive = forgetting). *Params*: active parameters '
            'after the last cycle. *Run s*: wall time summed over seeds, '
            'without compilation; *Compile s*: time spent compiling, summed '
            f'over seeds ({_DASH}: not recorded, and Run s includes it). '
            f'{_DASH}: not in this results.json.',
            '', "The paper's numbers (arXiv 2606.03979, no-context accuracy "
            'after continued pretraining on 200 SQuAD passages) are at paper '
            'scale on SQuAD, a different task and model; they are side by '
            'side for direction, not for comparing magnitudes.', '']

  base, chance = results.get('base'), results.get('chance')
  if isinstance(base, dict) and base.get('acc') is not None:
    lines.append(f'Base model accuracy on the base population: '
                 f'{_percent(base["acc"])}% (paper base model on SQuAD CPT: '
                 f'{PAPER_SQUAD_CPT["base"]:.1f}%).')
    lines.append('')
  if chance is not None:
    lines += [f'Chance accuracy: {_percent(chance)}%.', '']
  if comparison:
    lines += [f'![Final ACC and forgetting per method]({comparison})', '']

  tuning = results.get('tuning')
  if isinstance(tuning, dict) and tuning:
    lines += ['## Learning-rate sweep (final ACC)', '']
    lines += _tuning_table(tuning) + ['']

  for name, method in methods.items():
    matrix = _matrix_array(method['acc_matrix'])
    header = [''] + [f'session {j}' for j in range(1, matrix.shape[1] + 1)]
    rows = [[f'after cycle {i}'] + [_percent(a) for a in row]
            for i, row in enumerate(matrix, 1)]
    heatmap, forgetting = plots[name]
    lines += [f'## {method_label(name)}', '']
    own = [run.get('seed') for run in method.get('per_seed') or []]
    if own and own != list(seeds):
      lines += [f'Seeds of this method: {_seed_list(own)} (the run: '
                f'{_seed_list(seeds)}).', '']
    lines += _markdown_table(header, rows)
    lines += ['', f'![accuracy matrix]({heatmap})',
              f'![forgetting curves]({forgetting})', '']
    stages = _stage_table(method)
    if stages:
      lines += ['Recall of the current session and of the base population '
                'after each stage of a cycle (mean over seeds):', '']
      lines += stages + ['']
  return '\n'.join(lines)


def _incomplete_text(complete) -> str:
  """The warning of a results.json written before the job finished, naming
  the (method, seed) runs whose every cycle did."""
  if complete is None:
    done = 'not recorded'
  else:
    seeds = {}  # method -> its complete seeds, in the order listed
    for name, seed in complete:
      seeds.setdefault(name, []).append(seed)
    done = '; '.join(f'{method_label(n)} (seed{"s" if len(s) > 1 else ""} '
                     f'{_seed_list(s)})' for n, s in seeds.items()) or 'none'
  return ('**Incomplete run**: results.json was written before the job '
          'finished (it is still running, or was interrupted), so methods '
          f'and seeds may be missing. Complete (method, seed) runs: {done}.')


def _stage_table(method: dict) -> list[str]:
  """Rows = cycles, columns = session and base recall after each stage the
  cycles recorded (per_seed[s]['cycles'][i]['stages']); [] if none did."""
  per_seed = method.get('per_seed') or []
  cycles = max((len(r.get('cycles') or []) for r in per_seed), default=0)
  # [cycle][stage][part] -> values over the seeds that recorded it
  values = [{} for _ in range(cycles)]
  for run in per_seed:
    for i, cycle in enumerate(run.get('cycles') or []):
      for stage, probe in ((cycle or {}).get('stages') or {}).items():
        for part in ('session', 'base'):
          if (probe or {}).get(part) is not None:
            values[i].setdefault(stage, {}).setdefault(part, []).append(
                float(probe[part]))
  seen = {stage for cycle in values for stage in cycle}
  if not seen:
    return []
  stages = [s for s in _STAGE_ORDER if s in seen] + sorted(
      seen - set(_STAGE_ORDER))
  header = ['Cycle'] + [f'{stage} {part}' for stage in stages
                        for part in ('session', 'base')]
  rows = [[str(i)] + [_percent(np.mean(cycle[stage][part]))
                      if cycle.get(stage, {}).get(part) else ''
                      for stage in stages for part in ('session', 'base')]
          for i, cycle in enumerate(values, 1)]
  return _markdown_table(header, rows)


def _tuning_table(tuning: dict) -> list[str]:
  """Rows = methods, columns = every learning rate any method tried."""
  sweeps = {name: sweep if isinstance(sweep, dict) else {'': sweep}
            for name, sweep in tuning.items()}
  columns = list(dict.fromkeys(lr for sweep in sweeps.values() for lr in sweep))
  rows = [[method_label(name)] +
          [_percent(sweep[lr]) if isinstance(sweep.get(lr), (int, float))
           else str(sweep.get(lr, '')) for lr in columns]
          for name, sweep in sweeps.items()]
  return _markdown_table(['Method'] + [f'lr {lr}' for lr in columns], rows)


# ------------------------------------------------------------------ plots ---


def _plot_acc_matrix(matrix: np.ndarray, title: str, path: str) -> None:
  matrix = 100 * matrix
  rows, cols = matrix.shape
  fig, ax = plt.subplots(figsize=(max(4.5, 1.0 * cols + 2.5),
                                  max(3.5, 0.8 * rows + 1.8)))
  cmap = plt.get_cmap('viridis').with_extremes(bad='lightgrey')
  image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0,
                    vmax=100.0, aspect='auto')
  for i in range(rows):
    for j in range(cols):
      if not np.isnan(matrix[i, j]):
        ax.text(j, i, f'{matrix[i, j]:.1f}', ha='center', va='center',
                fontsize=10, color='black' if matrix[i, j] > 60 else 'white')
  ax.set_xticks(range(cols), [str(j) for j in range(1, cols + 1)])
  ax.set_yticks(range(rows), [str(i) for i in range(1, rows + 1)])
  ax.set_xlabel('session j')
  ax.set_ylabel('after cycle i')
  ax.set_title(title)
  fig.colorbar(image, ax=ax, label='recall (%)')
  fig.tight_layout()
  fig.savefig(path, dpi=_DPI)
  plt.close(fig)


def _plot_forgetting(acc_matrix, title: str, path: str) -> None:
  fig, ax = plt.subplots(figsize=(6, 4))
  # Session j is first measured after cycle j, the cycle that learns it.
  for j, curve in enumerate(cl_eval.forgetting_curves(acc_matrix), 1):
    values = [np.nan if a is None else 100 * float(a) for a in curve]
    ax.plot(range(j, j + len(values)), values, marker='o',
            label=f'session {j}')
  ax.set_xticks(range(1, len(acc_matrix) + 1))
  ax.set_ylim(0.0, 100.0)
  ax.set_xlabel('after cycle i')
  ax.set_ylabel('recall on session j (%)')
  ax.set_title(f'{title}: forgetting curves')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=_DPI)
  plt.close(fig)


def _plot_scores(methods: dict, key: str, fallback: str
                 ) -> tuple[str, np.ndarray]:
  """(key used, [methods, (mean, std)]): `key` if every method has it, else
  `fallback` — one bar chart never mixes two different scores."""
  scores = [_score(methods[n], key) for n in methods]
  if any(s is None for s in scores):
    key, scores = fallback, [_score(methods[n], fallback) for n in methods]
  return key, np.array([s or (np.nan, 0.0) for s in scores], dtype=float)


_PLOT_NAMES = {'final_acc_all': 'Final ACC all (base + sessions)',
               'final_acc': 'Final ACC (sessions)',
               'forgetting': 'Forgetting', 'bwt': 'BWT'}


def _plot_methods(methods: dict, chance, path: str) -> None:
  names = list(methods)
  acc_key, acc = _plot_scores(methods, 'final_acc_all', 'final_acc')
  drop_key, drop = _plot_scores(methods, 'forgetting', 'bwt')
  acc, drop = 100 * acc, 100 * drop
  labels = [method_label(n) for n in names]
  x = np.arange(len(names))
  fig, (acc_ax, bwt_ax) = plt.subplots(
      1, 2, figsize=(max(8.0, 1.6 * len(names) + 3.0), 5.0))
  acc_ax.bar(x, acc[:, 0], yerr=acc[:, 1], capsize=4, color='tab:blue')
  if chance is not None:
    acc_ax.axhline(100 * chance, color='grey', linestyle='--',
                   label='chance')
    acc_ax.legend(fontsize=9)
  acc_ax.set_ylim(0.0, 100.0)
  acc_ax.set_ylabel(f'{_PLOT_NAMES[acc_key]} (%)')
  acc_ax.set_title(f'{_PLOT_NAMES[acc_key]}\n'
                   '(mean ± std over seeds)')
  bwt_ax.bar(x, drop[:, 0], yerr=drop[:, 1], capsize=4, color='tab:red')
  bwt_ax.axhline(0.0, color='black', linewidth=0.8)
  bwt_ax.set_ylabel(f'{_PLOT_NAMES[drop_key]} (percentage points)')
  bwt_ax.set_title(f'{_PLOT_NAMES[drop_key]}\n'
                   '(mean ± std over seeds)')
  for ax in (acc_ax, bwt_ax):
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha='right', fontsize=9)
    ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=_DPI)
  plt.close(fig)


def plot_dreaming(results: dict, path: str) -> None:
  """The dreaming study's runs: rewarded fraction per round, recall after."""
  runs = results['runs']
  fig, (round_ax, recall_ax) = plt.subplots(
      1, 2, figsize=(max(10.0, 1.4 * len(runs) + 6.0), 4.5))
  for run in runs:
    if run['rounds']:
      round_ax.plot([r['round'] for r in run['rounds']],
                    [r['reward_fraction'] for r in run['rounds']], marker='o',
                    label=run['label'])
  round_ax.set_xlabel('ReST-EM round')
  round_ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  round_ax.set_ylabel('fraction of kept dreams rewarded')
  round_ax.set_ylim(0.0, 1.0)
  round_ax.set_title('Rewarded dreams per round')
  round_ax.grid(alpha=0.3)
  if any(run['rounds'] for run in runs):
    round_ax.legend(fontsize=8)
  x = np.arange(len(runs))
  before = results['before']
  for offset, key, color in ((-0.2, 'new', 'tab:green'),
                             (0.2, 'base', 'tab:blue')):
    recall_ax.bar(x + offset, [run['recall'][key] for run in runs], width=0.4,
                  color=color, label=f'{key} facts, after')
    recall_ax.axhline(before[key], color=color, linestyle=':',
                      label=f'{key} facts, before')
  recall_ax.axhline(results['chance'], color='grey', linestyle='--',
                    label='chance')
  recall_ax.set_xticks(x)
  recall_ax.set_xticklabels([run['label'] for run in runs], rotation=30,
                            ha='right', fontsize=8)
  recall_ax.set_ylim(0.0, 1.4)  # room above the bars for the legend
  recall_ax.set_yticks(np.linspace(0.0, 1.0, 6))
  recall_ax.set_ylabel('closed-book recall')
  recall_ax.set_title('Recall after rehearsal')
  recall_ax.legend(fontsize=8, ncol=3, loc='upper center')
  recall_ax.grid(axis='y', alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=_DPI)
  plt.close(fig)
