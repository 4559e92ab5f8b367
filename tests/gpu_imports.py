"""Import fsmtl as the GPU machine would, with only its packages and the device kit's: print what was refused, as JSON.

Usage: `python tests/gpu_imports.py MACHINE_LIST KIT_LIST MODULE...` (the lists: `name` or `name==version` a line).
A distribution that fsmtl or a kit package imports, and that is neither on the machine's list nor in the kit, is refused
with `ModuleNotFoundError`, as it would be there; an import guarded for an optional package then takes its fallback, an
unguarded one fails the whole import. What the machine's own packages import is left alone: there they come with their
own dependencies, which need not be those installed here. The bench scripts' folder is on `sys.path`, so `gpu`,
`probe`, ... name them.
"""
import builtins
import importlib
import importlib.metadata as md
import json
import re
import sys
from pathlib import Path


def canonical(name): return re.sub(r'[-_.]+', '-', name).lower()


def names(path):
    "The canonical distribution names of a package list."
    lines = (l.split('#')[0].strip() for l in Path(path).read_text().splitlines())
    return {canonical(re.split(r'[=<>!~ ]', l)[0]) for l in lines if l}


class GPUMachine:
    "An `__import__` that refuses distributions the machine lacks when fsmtl or a kit package asks for them."
    # wrapping `__import__`, not a finder, sees imports of modules already loaded (by a package of the machine, say) too
    def __init__(self, machine, kit):
        self.allowed, self.checked = machine | kit | {'fsmtl'}, kit | {'fsmtl'}
        self.dists = {m: {canonical(d) for d in ds} for m, ds in md.packages_distributions().items()}
        self.refused, self.imported, self.original = [], set(), builtins.__import__

    def importer(self, globals):
        "The distribution of the module running an import: fsmtl for fsmtl, the bench scripts and this script."
        module = (globals or {}).get('__name__') or ''
        top = module.split('.')[0]
        if top in ('fsmtl', '__main__') or Path((globals or {}).get('__file__') or '').parent.name == 'bench': return 'fsmtl'
        return next(iter(self.dists.get(top, ())), None)

    def __call__(self, name, globals=None, locals=None, fromlist=(), level=0):
        top = name.split('.')[0]
        if level == 0 and top not in sys.stdlib_module_names:
            dists = self.dists.get(top, set())
            if dists and not dists & self.allowed and (by := self.importer(globals)) in self.checked:
                self.refused.append(dict(module=top, distributions=sorted(dists), importer=by))
                raise ModuleNotFoundError(f"No module named {top!r} (not on the GPU machine)", name=top)
            self.imported |= dists
        return self.original(name, globals, locals, fromlist, level)


def main():
    machine, kit, modules = names(sys.argv[1]), names(sys.argv[2]), sys.argv[3:]
    sys.path.insert(0, str(Path(__file__).parents[1] / 'bench'))
    builtins.__import__ = machine_import = GPUMachine(machine, kit)
    for m in modules: importlib.import_module(m)
    print(json.dumps(dict(refused=machine_import.refused, imported=sorted(machine_import.imported))))


if __name__ == '__main__':
    main()
