"Every public name of `fsmtl.all` reads well under `help()` and nbdev's `show_doc`: a one-line docstring, a comment per argument."
import dataclasses
import importlib
import inspect
import re
import statistics

import pytest
from fastai.callback.core import _events
from fastai.learner import Learner, Recorder
from fastcore.docments import docments

import fsmtl.all


def _documented_args(obj):
    "The arguments of `obj` a caller passes (for a class, those of its own `__init__` or its fields), with their comments."
    if inspect.isclass(obj):
        if hasattr(obj, '_fields'):  # a NamedTuple: a comment after each field's line
            src = inspect.getsource(obj)
            return {f: (m.group(1).strip() if (m := re.search(rf'^\s+{f}\s*:[^#\n]*#([^\n]*)', src, re.M)) else None)
                    for f in obj._fields}
        if dataclasses.is_dataclass(obj): target = obj
        elif '__init__' in vars(obj): target = obj.__init__
        else: return {}
    else: target = obj
    return {k: v['docment'] for k, v in docments(target, full=True, args_kwargs=True).items() if k not in ('self', 'return')}


def _one_line(obj):
    doc = obj.__doc__
    return bool(doc) and doc.strip() != '' and '\n' not in doc.strip()


def test_all_lists_every_public_function_and_class():
    for m in fsmtl.all.MODULES:
        mod = importlib.import_module(f'fsmtl.{m}')
        for n in mod.__all__:
            obj = getattr(mod, n)
            if inspect.isclass(obj) or inspect.isfunction(obj): assert n in fsmtl.all.__all__, f"{m}.{n}"
    assert len(fsmtl.all.__all__) == len(set(fsmtl.all.__all__)) > 50
    ns = {}
    exec('from fsmtl.all import *', ns)
    assert set(ns) - {'__builtins__'} == set(fsmtl.all.__all__)


@pytest.mark.parametrize('name', fsmtl.all.__all__)
def test_public_name_documented(name):
    obj = getattr(fsmtl.all, name)
    assert obj.__module__.startswith('fsmtl.'), f"{name} comes from {obj.__module__}"
    assert _one_line(obj), f"{name} needs a one-line docstring, has {obj.__doc__!r}"
    args = _documented_args(obj)
    missing = [a for a, c in args.items() if not c]
    assert not missing, f"{name}: no comment after the argument(s) {missing}"
    if inspect.isfunction(obj):   # show_doc reads no comment of **kwargs, which must not then pass for the return's
        ret = docments(obj)['return']
        assert ret is None or ret not in args.values(), f"{name}: show_doc reads {ret!r} as the return's comment"


# what fastai, torch and timm call rather than the user: callback events and the overridden hooks of a framework
FRAMEWORK = set(_events) | {'forward', 'create_item', 'create_batch', 'new', 'encodes', 'decodes'}
METHODS = [(n, m) for n in fsmtl.all.__all__ if inspect.isclass(c := getattr(fsmtl.all, n))
           for k in c.__mro__ if k.__module__.startswith('fsmtl.')
           for m, f in vars(k).items() if not m.startswith('_') and m not in FRAMEWORK
           and inspect.isfunction(getattr(f, '__func__', f))]


# fastai's house style: one short line; fastai's own docstrings have a median of about 60 characters
DOC_MEDIAN, DOC_MAX = 70, 100


def _doc_lengths():
    "Characters of the docstring of each public name of `fsmtl.all` and of each of their public methods."
    docs = {n: getattr(fsmtl.all, n).__doc__ for n in fsmtl.all.__all__}
    docs.update({f'{c}.{m}': getattr(getattr(fsmtl.all, c), m).__doc__ for c, m in METHODS})
    return {n: len((d or '').strip()) for n, d in docs.items()}


def _long_docs(lengths,              # name -> characters of its docstring
               median=DOC_MEDIAN,    # the most the median may be
               most=DOC_MAX):        # the most any one may be
    "What breaks the length limits in `lengths`: the median if over `median`, each name over `most`."
    over = [f"{n} ({k})" for n, k in sorted(lengths.items(), key=lambda o: -o[1]) if k > most]
    mid = statistics.median(lengths.values())
    return ([f"median {mid} > {median}"] if mid > median else []) + over


def test_docstrings_are_short():
    lengths = _doc_lengths()
    assert len(lengths) > 100
    problems = _long_docs(lengths)
    assert not problems, f"docstrings over fastai's lengths: {', '.join(problems)}"


def test_length_check_catches_long_docstrings():
    assert _long_docs({'a': 50, 'b': 60, 'c': 100}) == []
    assert _long_docs({'a': 50, 'b': 60, 'c': 101}) == ['c (101)']
    assert _long_docs({'a': 71, 'b': 71, 'c': 10}) == ['median 71 > 70']


@pytest.mark.parametrize('cls,name', METHODS)
def test_public_methods_documented(cls, name):
    meth = getattr(getattr(fsmtl.all, cls), name)
    assert _one_line(meth), f"{cls}.{name} needs a one-line docstring"
    missing = [a for a, c in _documented_args(meth).items() if not c and a != 'cls']
    assert not missing, f"{cls}.{name}: no comment after the argument(s) {missing}"


@pytest.mark.parametrize('cls,name', [(Learner, 'evaluate'), (Learner, 'fit_plateau'), (Learner, 'fit_step'),
                                      (Recorder, 'history'), (Recorder, 'plot_episodic')])
def test_patched_methods_documented(cls, name):
    meth = getattr(cls, name)
    assert _one_line(meth), f"{cls.__name__}.{name}"
    assert all(_documented_args(meth).values()), f"{cls.__name__}.{name}: {_documented_args(meth)}"


def test_check_catches_a_missing_comment():
    def f(a,   # the first
          b): "Adds."
    def g(a): "Adds.\n\nAnd more."
    assert _documented_args(f) == {'a': 'the first', 'b': None}
    assert not _one_line(g) and _one_line(f)
