"""report.md and plots/ of the knowledge study, from its results.json.

The table puts our measured rows (mean ± std over seeds, %) next to the
Sleep paper's numbers, which are labelled as paper scale: another backbone
(Qwen-scale), n=200 passages and an LLM grader, so only the ordering of the
rows is comparable, not the values.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sleep_jax.studies import knowledge  # noqa: E402


def _cell(entry: dict | None, grader: str) -> str:
  if not entry or grader not in entry:
    return '—'
  mean, std = 100 * entry[grader], 100 * entry[f'{grader}_std']
  if entry['seeds'] > 1:
    return f'{mean:.1f} ± {std:.1f}'
  return f'{mean:.1f}'


def table(results: dict) -> list[str]:
  regimes = [r for r in knowledge.REGIMES
             if any(r in v for v in results['rows'].values())]
  head = ['row']
  for regime in regimes:
    head += [f'{regime} {g}' for g in knowledge.GRADERS]
  head += [f'paper {r}' for r in regimes]
  lines = ['| ' + ' | '.join(head) + ' |',
           '|' + '---|' * len(head)]
  for row in knowledge.ROWS:
    if row not in results['rows']:
      continue
    cells = [row]
    for regime in regimes:
      cells += [_cell(results['rows'][row].get(regime), g)
                for g in knowledge.GRADERS]
    paper = knowledge.PAPER.get(row)
    for regime in regimes:
      cells.append('—' if paper is None else
                   f'{paper[knowledge.REGIMES.index(regime)]:.1f}')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def stages(results: dict) -> list[str]:
  """F1 after each Sleep stage, per unit: where Sleep gains or loses."""
  lines = ['| unit | after wake | after consolidation | after dreaming |',
           '|---|---|---|---|']
  for name, unit in sorted(results['units'].items()):
    st = unit.get('stages')
    if not st:
      continue
    cell = lambda k: f"{100 * st[k]['f1']:.1f}" if k in st else '—'
    lines.append(f"| {name} | {cell('after_wake')} | "
                 f"{cell('after_consolidation')} | {cell('sleep')} |")
  return lines if len(lines) > 2 else []


def timing(results: dict) -> list[str]:
  """Seconds per unit, and how many of them went to compiling (a second
  run of the same shapes in one process does not pay those)."""
  lines = ['| unit | seconds | compiling |', '|---|---|---|']
  for name, unit in results['units'].items():
    compiling = unit.get('compile_seconds')
    lines.append(f"| {name} | {unit['seconds']:.0f} | "
                 f"{'—' if compiling is None else f'{compiling:.0f}'} |")
  return lines


def plot(results: dict, path: str) -> None:
  rows = [r for r in knowledge.ROWS if r in results['rows']]
  regimes = [r for r in knowledge.REGIMES
             if any(r in results['rows'][row] for row in rows)]
  fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(rows) + 3), 4.5))
  x = np.arange(len(rows))
  width = 0.8 / max(len(regimes), 1)
  for i, regime in enumerate(regimes):
    means = [100 * results['rows'][r].get(regime, {}).get('f1', np.nan)
             for r in rows]
    stds = [100 * results['rows'][r].get(regime, {}).get('f1_std', 0.0)
            for r in rows]
    ax.bar(x + (i - (len(regimes) - 1) / 2) * width, means, width,
           yerr=stds, capsize=3, label=regime)
  ax.set_xticks(x)
  ax.set_xticklabels(rows, rotation=30, ha='right', fontsize=8)
  ax.set_ylabel('closed-book token F1 (%)')
  ax.set_title('Knowledge incorporation (SQuAD, no context)')
  ax.grid(axis='y', alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(results: dict, workdir: str) -> None:
  cfg = results['config']
  passages = results['passages']
  lines = [
      '# Knowledge incorporation (SQuAD, closed book)', '',
      f"Backbone `{cfg['backbone']['source']}` with "
      f"{len(cfg['fast_levels'])} fast CMS level(s); "
      f"{len(passages['eval'])} evaluated passages "
      f"({passages['questions']} questions), {len(passages['train'])} "
      f"ReST-EM training passages; seeds {list(cfg['seeds'])}; "
      f"{results['seconds']:.0f} s.", '',
      'Scores in %: SQuAD exact match, token F1, and the semantic judge '
      f"(`{cfg['judge']['name']}`). Paper columns: the Sleep paper's "
      'no-context accuracy at paper scale (another backbone, n=200, an LLM '
      'grader): compare the ordering of rows, not the values.', '',
      *table(results), '']
  stage_lines = stages(results)
  if stage_lines:
    lines += ['## Sleep, stage by stage (token F1, %)', '', *stage_lines, '']
  os.makedirs(os.path.join(workdir, 'plots'), exist_ok=True)
  plot(results, os.path.join(workdir, 'plots', 'knowledge.png'))
  lines += ['![F1 per row](plots/knowledge.png)', '',
            '## Time (this run)', '', *timing(results), '']
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write('\n'.join(lines))
