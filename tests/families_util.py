"What the family test modules share: which presets this install can run, as pytest parameters, and one thread."
import importlib.util
import pytest
import torch
from llavamed.core import IGNORE_INDEX
from llavamed.families import family_of


def missing(preset: str) -> list[str]:
    "The packages the preset's processor needs that are not installed."
    return [p for p in family_of(preset).needs if importlib.util.find_spec(p) is None]


def preset_params(presets) -> list:
    "The presets as pytest parameters, each skipped with the packages it lacks named."
    return [pytest.param(p, marks=pytest.mark.skipif(bool(missing(p)), reason=f"{p}'s processor needs "
                                                     f"{' and '.join(missing(p))} (not installed)"))
            for p in presets]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "The module's tests on one thread (the tiny models' timings and results do not depend on the machine's cores)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def supervised_runs(tok, labels) -> list[str]:
    "The decoded runs of supervised (not ignored) labels, in order."
    runs, cur = [], []
    for t in list(labels) + [IGNORE_INDEX]:
        if t != IGNORE_INDEX: cur.append(t)
        elif cur: runs.append(tok.decode(cur)); cur = []
    return runs
