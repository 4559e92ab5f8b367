"fsmtl's imports point one way: no circle among its modules, lazy imports included, and none back up the floors."
import ast
from pathlib import Path

import pytest

from fsmtl.checkpoint import Checkpoints
from fsmtl.runlog import RunCSVLogger

PKG = Path(__file__).parents[1] / 'fsmtl'


def _module(path):
    "The dotted name of the module in `path`."
    parts = path.relative_to(PKG.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imported(node, name, is_pkg):
    "The fsmtl modules that the import `node` in module `name` brings in."
    if isinstance(node, ast.Import): return [a.name for a in node.names if a.name.startswith('fsmtl')]
    if node.level == 0: base = node.module or ''
    else:
        here = name.split('.') if is_pkg else name.split('.')[:-1]
        base = '.'.join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
    if not base.startswith('fsmtl'): return []
    # `from .data import tasks` brings in the module `fsmtl.data.tasks`; `from .tasks import X` the module `fsmtl.data.tasks`
    return [f'{base}.{a.name}' if (PKG.parent / f'{base}.{a.name}'.replace('.', '/')).with_suffix('.py').exists()
            else base for a in node.names]


def import_graph(pkg=PKG):
    "Module -> the fsmtl modules it imports, at the top or inside a function."
    graph = {}
    for path in pkg.rglob('*.py'):
        name = _module(path)
        nodes = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[name] = {m for n in nodes for m in _imported(n, name, path.name == '__init__.py')} - {name}
    return graph


def circles(graph):
    "Each import circle of `graph`, as the modules along it."
    found, state = [], {}
    def visit(m, path):
        state[m] = 'open'
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 'open': found.append(path[path.index(n):] + [n])
            elif n not in state: visit(n, path + [n])
        state[m] = 'done'
    for m in sorted(graph):
        if m not in state: visit(m, [m])
    return found


def test_the_graph_sees_relative_and_lazy_imports():
    g = import_graph()
    assert 'fsmtl.data.tasks' in g['fsmtl.scoring'] and 'fsmtl.data.glyphs' in g['fsmtl.data.benchmarks']   # `from ..`, lazy
    assert circles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c', 'a']]


def test_no_import_circle():
    assert circles(import_graph()) == []


@pytest.mark.parametrize('module,below', [
    ('fsmtl.progress', set()),                              # the ground floor: nothing of fsmtl
    ('fsmtl.data.glyphs', {'fsmtl.files', 'fsmtl.progress', 'fsmtl.data.core'}),
    ('fsmtl.runlog', {'fsmtl.files'}),                      # not `checkpoint`
    ('fsmtl.distributed', {'fsmtl.data.tasks'}),            # ranks and shares; the trainer callback is in `ddp`
    ('fsmtl.scoring', {'fsmtl.data.tasks', 'fsmtl.distributed', 'fsmtl.features', 'fsmtl.probe', 'fsmtl.progress'}),
    ('fsmtl.callbacks', {'fsmtl.data.tasks', 'fsmtl.distributed', 'fsmtl.features', 'fsmtl.scoring'})])
def test_what_the_lower_floors_import(module, below):
    assert import_graph()[module] == below


def test_the_rank_helpers_leave_the_trainer_out():
    # `fsmtl.distributed` serves the scoring and the checkpoints; fastai's trainer, on accelerate, only a training run
    tree = ast.parse((PKG / 'distributed.py').read_text())
    outside = {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 0}
    outside |= {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert 'torch.distributed' in outside and not {m for m in outside if m.startswith(('fastai.distributed', 'accelerate'))}
    tree = ast.parse((PKG / 'ddp.py').read_text())
    assert 'fastai.distributed' in {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}


def test_the_history_row_is_written_after_the_checkpoint():
    assert RunCSVLogger.order > Checkpoints.order


def test_no_module_imports_a_private_name_of_another():
    private = [f"{_module(p)}: {a.name}" for p in PKG.rglob('*.py') for n in ast.walk(ast.parse(p.read_text()))
               if isinstance(n, ast.ImportFrom) and (n.level or (n.module or '').startswith('fsmtl'))
               for a in n.names if a.name.startswith('_') and not a.name.startswith('__')]
    assert private == []
