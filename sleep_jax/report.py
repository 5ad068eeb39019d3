"""Human-readable report of a continual-learning experiment (DESIGN §8).

`write_report(results, workdir)` turns the `results` dict of an experiment
into <workdir>/report.md (a results table, per-method accuracy matrices, the
optional learning-rate sweep) and PNG plots under <workdir>/plots/: one
accuracy-matrix heatmap and one forgetting-curve plot per method, and one
bar chart comparing the methods' final ACC and BWT.

`plot_dreaming(results, path)` draws the dreaming study's results.json
(sleep_jax.dreaming_study): rewarded dreams per ReST-EM round, and recall of
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


def method_label(name: str) -> str:
  """The human label of a method; unknown names are shown as they are."""
  return METHOD_LABELS.get(name, name)


def write_report(results: dict, workdir: str) -> list[str]:
  """Writes <workdir>/report.md and <workdir>/plots/*.png; returns the paths written."""
  methods = results.get('methods') or {}
  os.makedirs(os.path.join(workdir, 'plots'), exist_ok=True)
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


def _method_scores(method: dict) -> tuple[float, float, float, float]:
  """(final ACC, its std, BWT, its std), computed from the matrix if absent."""
  matrix = method['acc_matrix']
  acc, bwt = method.get('final_acc'), method.get('bwt')
  return (cl_eval.final_acc(matrix) if acc is None else acc,
          method.get('final_acc_std') or 0.0,
          cl_eval.bwt(matrix) if bwt is None else bwt,
          method.get('bwt_std') or 0.0)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '|'.join(['---'] * len(header)) + '|']
  return lines + ['| ' + ' | '.join(row) + ' |' for row in rows]


def _report_markdown(results: dict, plots: dict, comparison) -> str:
  methods = results.get('methods') or {}
  seeds = results.get('seeds') or []
  sessions = len(next(iter(methods.values()))['acc_matrix']) if methods else 0
  lines = ['# Continual-learning report', '',
           f'Seeds: {", ".join(str(s) for s in seeds) or "none"}; '
           f'{sessions} session(s). Accuracies are closed-book recall on the '
           'people of each session, averaged over seeds.', '']

  rows = []
  for name, method in methods.items():
    acc, acc_std, bwt, bwt_std = _method_scores(method)
    params, seconds = method.get('params'), method.get('seconds')
    paper = PAPER_SQUAD_CPT.get(name)
    rows.append([method_label(name), _percent_pm(acc, acc_std),
                 _percent_pm(bwt, bwt_std, signed=True),
                 _DASH if params is None else f'{int(params):,}',
                 _DASH if seconds is None else f'{round(seconds):d}',
                 _DASH if paper is None else f'{paper:.1f} (SQuAD CPT)'])
  lines += _markdown_table(['Method', 'Final ACC (mean ± std)',
                            'BWT (mean ± std)', 'Params', 'Seconds',
                            'Paper reference'], rows)
  lines += ['', "The paper's numbers (arXiv 2606.03979, no-context accuracy "
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
    lines += [f'![Final ACC and BWT per method]({comparison})', '']

  tuning = results.get('tuning')
  if isinstance(tuning, dict) and tuning:
    lines += ['## Learning-rate sweep (final ACC %)', '']
    lines += _tuning_table(tuning) + ['']

  for name, method in methods.items():
    matrix = _matrix_array(method['acc_matrix'])
    header = [''] + [f'session {j}' for j in range(matrix.shape[1])]
    rows = [[f'after cycle {i}'] + [_percent(a) for a in row]
            for i, row in enumerate(matrix)]
    heatmap, forgetting = plots[name]
    lines += [f'## {method_label(name)}', ''] + _markdown_table(header, rows)
    lines += ['', f'![accuracy matrix]({heatmap})',
              f'![forgetting curves]({forgetting})', '']
  return '\n'.join(lines)


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
  rows, cols = matrix.shape
  fig, ax = plt.subplots(figsize=(max(4.5, 1.0 * cols + 2.5),
                                  max(3.5, 0.8 * rows + 1.8)))
  cmap = plt.get_cmap('viridis').with_extremes(bad='lightgrey')
  image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0,
                    vmax=1.0, aspect='auto')
  for i in range(rows):
    for j in range(cols):
      if not np.isnan(matrix[i, j]):
        ax.text(j, i, f'{100 * matrix[i, j]:.1f}', ha='center', va='center',
                fontsize=10, color='black' if matrix[i, j] > 0.6 else 'white')
  ax.set_xticks(range(cols))
  ax.set_yticks(range(rows))
  ax.set_xlabel('session j')
  ax.set_ylabel('after cycle i')
  ax.set_title(title)
  fig.colorbar(image, ax=ax, label='accuracy')
  fig.tight_layout()
  fig.savefig(path, dpi=_DPI)
  plt.close(fig)


def _plot_forgetting(acc_matrix, title: str, path: str) -> None:
  fig, ax = plt.subplots(figsize=(6, 4))
  for j, curve in enumerate(cl_eval.forgetting_curves(acc_matrix)):
    values = [np.nan if a is None else float(a) for a in curve]
    ax.plot(range(j, j + len(values)), values, marker='o',
            label=f'session {j}')
  ax.set_xticks(range(len(acc_matrix)))
  ax.set_ylim(0.0, 1.0)
  ax.set_xlabel('after cycle i')
  ax.set_ylabel('accuracy on session j')
  ax.set_title(f'{title}: forgetting curves')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=_DPI)
  plt.close(fig)


def _plot_methods(methods: dict, chance, path: str) -> None:
  names = list(methods)
  scores = np.array([_method_scores(methods[n]) for n in names], dtype=float)
  labels = [method_label(n) for n in names]
  x = np.arange(len(names))
  fig, (acc_ax, bwt_ax) = plt.subplots(
      1, 2, figsize=(max(8.0, 1.6 * len(names) + 3.0), 5.0))
  acc_ax.bar(x, scores[:, 0], yerr=scores[:, 1], capsize=4, color='tab:blue')
  if chance is not None:
    acc_ax.axhline(chance, color='grey', linestyle='--', label='chance')
    acc_ax.legend(fontsize=9)
  acc_ax.set_ylim(0.0, 1.0)
  acc_ax.set_ylabel('final ACC')
  acc_ax.set_title('Final ACC (mean ± std over seeds)')
  bwt_ax.bar(x, scores[:, 2], yerr=scores[:, 3], capsize=4, color='tab:red')
  bwt_ax.axhline(0.0, color='black', linewidth=0.8)
  bwt_ax.set_ylabel('BWT')
  bwt_ax.set_title('BWT (mean ± std over seeds)')
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
