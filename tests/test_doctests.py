"""The examples in the docstrings of ``ditopt.runtime`` and ``ditopt.passes`` run and print what
they say. Those packages live outside the ``ditopt/`` folder (``runtime/``, ``passes/``), so
``pytest --doctest-modules ditopt`` does not collect them, and collecting them by path would import
a second copy of each module (with its own runtime registry); they are run here by package name.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import ditopt.passes
import ditopt.runtime


def _with_examples() -> list[str]:
    names = [f"{pkg.__name__}.{m.name}" for pkg in (ditopt.runtime, ditopt.passes) for m in pkgutil.iter_modules(pkg.__path__)]
    finder = doctest.DocTestFinder()
    return [n for n in names if any(t.examples for t in finder.find(importlib.import_module(n)))]


MODULES = _with_examples()


def test_the_packages_have_examples_to_run():
    assert len(MODULES) >= 10, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    failures = []
    if result.failed:  # run again verbosely into a string to say which example failed
        import io
        from contextlib import redirect_stdout

        out = io.StringIO()
        with redirect_stdout(out):
            doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        failures.append(out.getvalue()[-3000:])
    assert result.attempted and not result.failed, "\n".join(failures)
