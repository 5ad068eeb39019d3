"""The docs hold together: cited design sections exist, README stays a short
user's guide, no stale citation forms, and every relative link resolves.

Fast: reads text files only (no JAX).
"""

import pathlib
import re

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_DESIGN = _ROOT / 'docs' / 'design.md'
_README = _ROOT / 'README.md'
_README_MAX_BYTES = 15 * 1024
_CITING_DIRS = ('sleep_jax', 'experiments', 'benchmarks', 'launch', 'tools',
                'tests')

# `docs/design.md §N` or `§N.M`, optionally a range `§N-M` / `§N.M-N.M`.
_SECTION = r'\d+(?:\.\d+)?'
_CITATION = re.compile(r'design\.md §(' + _SECTION + r')(?:-(' + _SECTION +
                       r'))?')
# Built from pieces so that this file does not match its own pattern.
_STALE = re.compile('|'.join([
    'DESIGN' + ' §',           # the old name of docs/design.md
    'DESIGN' + r'\.md',
    r'\(' + 'issue' + ' [0-9]',  # issue numbers belong in commits, not docs
]))
_HEADING = re.compile(r'^(?:## (\d+)\.|### (\d+\.\d+)) ')
_LINK = re.compile(r'\[[^\]\n]*\]\(([^)\s]+)\)')


def _citing_files() -> list[pathlib.Path]:
  files = [_README]
  for d in _CITING_DIRS:
    files += [p for p in sorted((_ROOT / d).rglob('*'))
              if p.suffix in ('.py', '.md') and p.is_file()
              and '__pycache__' not in p.parts]
  return files


def citations(text: str) -> list[tuple[int, str]]:
  """(line number, section) of every design.md citation in `text`; a range
  `§2-3` cites both ends."""
  out = []
  for number, line in enumerate(text.splitlines(), 1):
    for m in _CITATION.finditer(line):
      out += [(number, s) for s in m.groups() if s]
  return out


def design_sections(text: str) -> set[str]:
  """Section numbers with a heading: `## N.` and `### N.M`."""
  sections = set()
  for line in text.splitlines():
    m = _HEADING.match(line)
    if m:
      sections.add(m.group(1) or m.group(2))
  return sections


def missing_citations(files, sections, root=_ROOT) -> list[str]:
  """`file:line: citation` for each citation with no heading in `sections`."""
  return [f'{p.relative_to(root)}:{line}: docs/design.md §{s}'
          for p in files
          for line, s in citations(p.read_text(encoding='utf-8'))
          if s not in sections]


def _unfenced(text: str):
  """(line number, line) of the lines outside fenced code blocks."""
  fenced = False
  for number, line in enumerate(text.splitlines(), 1):
    if line.lstrip().startswith('```'):
      fenced = not fenced
    elif not fenced:
      yield number, line


def _prose(text: str):
  """(line number, line) outside fenced code blocks, inline code removed."""
  for number, line in _unfenced(text):
    yield number, re.sub(r'`[^`]*`', '', line)


def slug(heading: str) -> str:
  """GitHub's anchor for a markdown heading's text."""
  text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return text.replace(' ', '-')


def anchors(text: str) -> set[str]:
  out, seen = set(), {}
  for _, line in _unfenced(text):
    m = re.match(r'^#{1,6} (.*)', line.replace('`', ''))
    if m:
      base = slug(m.group(1))
      n = seen.get(base, 0)
      seen[base] = n + 1
      out.add(base if n == 0 else f'{base}-{n}')
  return out


def broken_links(path: pathlib.Path, root=_ROOT) -> list[str]:
  """Relative links of markdown file `path` whose file (or, into a markdown
  file, whose heading anchor) does not exist."""
  bad = []
  for number, line in _prose(path.read_text(encoding='utf-8')):
    for target in _LINK.findall(line):
      if re.match(r'^[a-z][a-z0-9+.-]*:', target):  # http:, mailto:, ...
        continue
      file_part, _, anchor = target.partition('#')
      dest = (path.parent / file_part).resolve() if file_part else path
      where = f'{path.relative_to(root)}:{number}: ({target})'
      if not dest.exists():
        bad.append(f'{where} no such file')
      elif anchor and dest.suffix == '.md' and anchor not in anchors(
          dest.read_text(encoding='utf-8')):
        bad.append(f'{where} no such heading')
  return bad


# ------------------------------------------------------------------ tests ---


def test_every_cited_design_section_exists():
  sections = design_sections(_DESIGN.read_text(encoding='utf-8'))
  missing = missing_citations(_citing_files(), sections)
  assert not missing, ('cited sections with no heading in docs/design.md:\n' +
                       '\n'.join(missing))


def test_the_collector_finds_citations():
  cite = 'docs/design.md ' + '§'
  sample = f'x\n"""See {cite}4.2 and {cite}2-3."""\n# {cite}99.1\n'
  assert citations(sample) == [(2, '4.2'), (2, '2'), (2, '3'), (3, '99.1')]
  heads = design_sections('## 2. CMS\n### 4.2 LTI\n## 3. Growth\n#### 5.\n')
  assert heads == {'2', '3', '4.2'}
  assert '99.1' not in heads and '4' not in heads


def test_missing_citations_name_file_and_line(tmp_path):
  cite = 'docs/design.md ' + '§'
  f = tmp_path / 'pkg' / 'mod.py'
  f.parent.mkdir()
  f.write_text(f'a = 1\n# {cite}77\n')
  assert missing_citations([f], {'1'}, root=tmp_path) == [
      f'pkg/mod.py:2: {cite}77']
  assert not missing_citations([f], {'77'}, root=tmp_path)


def test_readme_is_short():
  size = _README.stat().st_size
  assert size <= _README_MAX_BYTES, (
      f'README.md is {size} bytes, over {_README_MAX_BYTES}: it is a user\'s '
      'guide; move measurements to experiments/results/ and explanations to '
      'docs/design.md.')


def test_no_stale_citation_forms():
  files = _citing_files() + [_DESIGN] + sorted((_ROOT / 'docs').rglob('*.md'))
  hits = [f'{p.relative_to(_ROOT)}:{n}: {line.strip()}'
          for p in dict.fromkeys(files)
          for n, line in enumerate(p.read_text(encoding='utf-8').splitlines(),
                                   1)
          if _STALE.search(line)]
  assert not hits, 'stale citation forms:\n' + '\n'.join(hits)


def test_stale_pattern_matches():
  assert _STALE.search('see ' + 'DESIGN' + ' §3')
  assert _STALE.search('(' + 'issue' + ' 23)')
  assert not _STALE.search('docs/design.md §3 (an issue of taste)')


@pytest.mark.parametrize(
    'path', [_README] + sorted((_ROOT / 'experiments' / 'results').glob('*.md')),
    ids=lambda p: str(p.relative_to(_ROOT)))
def test_relative_links_resolve(path):
  bad = broken_links(path)
  assert not bad, 'broken links:\n' + '\n'.join(bad)


def test_link_checker_sees_a_broken_link(tmp_path):
  page = tmp_path / 'page.md'
  (tmp_path / 'there.md').write_text(
      '# Top\n## 8. Public API contract\n```\n# nope\n```\n')
  page.write_text('# Page\n[ok](there.md#8-public-api-contract) '
                  '[web](https://example.com) [self](#page)\n'
                  '```\n[code](nowhere.md)\n```\n'
                  '[gone](nowhere.md) [bad anchor](there.md#nope)\n')
  assert broken_links(page, root=tmp_path) == [
      'page.md:6: (nowhere.md) no such file',
      'page.md:6: (there.md#nope) no such heading']


def test_slug_follows_github():
  assert slug('8. Public API contract') == '8-public-api-contract'
  assert slug('10.1 Continual knowledge incorporation (main job)') == (
      '101-continual-knowledge-incorporation-main-job')
  assert slug('9. What "fast" means here') == '9-what-fast-means-here'
