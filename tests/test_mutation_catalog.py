"""The mutation catalog (``tests/mutation/mutants.py``) stays valid as the code changes.

No mutant runs here (``python -m tests.mutation.run`` does that, see tests/mutation/README.md):
these checks only read files. They fail when an edit of a kernel or of the reference makes a
mutant's snippet disappear or occur twice, or a selection names a test file that is gone.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MUTATION = ROOT / "tests" / "mutation"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_fastopt_mutation_{name}", MUTATION / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


catalog = _load("mutants")
MUTANTS = catalog.MUTANTS
OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adadelta", "adam", "dbd")


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.id for m in MUTANTS])
def test_snippet_occurs_exactly_once_and_the_mutant_is_valid_python(mutant):
    source = (ROOT / mutant.file).read_text()
    assert source.count(mutant.original) == 1, f"{mutant.id}: snippet not found exactly once in {mutant.file}"
    assert mutant.replacement != mutant.original
    compile(source.replace(mutant.original, mutant.replacement), mutant.file, "exec")


def test_ids_are_unique():
    ids = [m.id for m in MUTANTS]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_every_field_is_known():
    for m in MUTANTS:
        assert m.category in catalog.CATEGORIES, m.id
        assert m.area in catalog.AREAS, m.id
        assert m.selection in catalog.SELECTIONS, m.id
        assert m.description.strip() and "\n" not in m.description, m.id


def test_every_category_is_represented():
    assert {m.category for m in MUTANTS} == set(catalog.CATEGORIES)


def test_mutants_span_backends_optimizers_extras_and_batch_norm():
    assert len(MUTANTS) >= 30
    for backend, prefix in (("numba", "kernels/numba_cpu/"), ("numpy", "fastopt/reference/")):
        planted = [m for m in MUTANTS if m.file.startswith(prefix)]
        assert planted and all(m.backend == backend for m in planted)
        assert {m.area for m in planted} == set(catalog.AREAS), backend
        assert {m.category for m in planted} >= {"swapped operands", "dropped term", "hyperparameter default"}, backend
    for name in ("optim.py", "multi.py", "batchnorm.py", "reduce.py"):
        assert any(m.file == "kernels/numba_cpu/" + name for m in MUTANTS), name
    for name in ("optim.py", "extras.py", "batchnorm.py"):
        assert any(m.file == "fastopt/reference/" + name for m in MUTANTS), name
    optimizer_ids = [m.id for m in MUTANTS if m.area == "optimizer"]
    for op in OPTIMIZERS:
        assert any(f"-{op}-" in i for i in optimizer_ids), op


@pytest.mark.parametrize("name", sorted(catalog.SELECTIONS))
def test_selections_name_existing_test_files(name):
    selection = catalog.SELECTIONS[name]
    assert selection.files
    for f in selection.files:
        assert f.startswith("tests/") and not f.startswith("tests/cudasim/"), f
        assert (ROOT / f).is_file(), f"selection {name}: {f} does not exist"


def test_every_selection_is_used():
    assert {m.selection for m in MUTANTS} == set(catalog.SELECTIONS)
