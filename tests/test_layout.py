"""The layout's one rule: the method never imports the studies."""

import ast
import pathlib

import pytest

_ROOT = pathlib.Path(__file__).resolve().parents[1] / 'sleep_jax'
_STUDIES = 'sleep_jax.studies'


def _imports(path: pathlib.Path) -> set[str]:
  """Every module `path` imports, as dotted names (`from a import b` gives
  both a and a.b, since b may be a module)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def _method_modules():
  return sorted(p for p in _ROOT.rglob('*.py')
                if _ROOT / 'studies' not in p.parents)


def _study_imports(path: pathlib.Path) -> list[str]:
  return sorted(n for n in _imports(path)
                if n == _STUDIES or n.startswith(_STUDIES + '.'))


@pytest.mark.parametrize('path', _method_modules(),
                         ids=lambda p: str(p.relative_to(_ROOT)))
def test_method_module_does_not_import_the_studies(path):
  assert not _study_imports(path), (
      f'{path.relative_to(_ROOT.parent)} imports {_study_imports(path)}: the '
      'method must not depend on a study; move what it needs out of '
      'sleep_jax/studies/.')


def test_the_check_sees_an_import_of_the_studies(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('from sleep_jax.studies import fact_world\n'
                 'import sleep_jax.studies.results\n')
  assert _study_imports(bad) == ['sleep_jax.studies',
                                 'sleep_jax.studies.fact_world',
                                 'sleep_jax.studies.results']
  lazy = tmp_path / 'lazy.py'
  lazy.write_text('def f():\n  from sleep_jax import studies\n')
  assert _study_imports(lazy) == ['sleep_jax.studies']


# A study named after the method piece it studies shares that module's name
# (studies/seeding.py studies seeding.py); every other study module's name
# is the study's alone.
_NAMED_AFTER_THE_METHOD = {'seeding', 'dreaming'}


def _study_stems() -> set[str]:
  return {p.stem for p in (_ROOT / 'studies').glob('*.py')
          if p.stem != '__init__'}


def test_no_study_module_outside_the_studies():
  studies = _study_stems() - _NAMED_AFTER_THE_METHOD
  outside = [str(p.relative_to(_ROOT)) for p in _method_modules()
             if p.stem in studies]
  assert not outside


def test_the_study_names_are_the_modules_that_exist():
  """The study names are read from sleep_jax/studies/, so they are every
  study module there (knowledge_*, continual_checks, ...) and nothing else;
  each exception must be a module on both sides, or it has gone stale."""
  stems = _study_stems()
  assert {'continual', 'continual_checks', 'knowledge'} <= stems  # the glob
  method = {p.stem for p in _method_modules()}
  assert _NAMED_AFTER_THE_METHOD <= stems & method, (
      sorted(_NAMED_AFTER_THE_METHOD - (stems & method)))
