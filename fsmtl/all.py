"The notebook surface: `from fsmtl.all import *` gives fsmtl's public functions and classes."
# fastai's own surface (`Learner.fit_one_cycle`, `show_batch` ...) is patched in on import; `from fastai.vision.all
# import *` brings its names. Constants (`OPTIONS`, `BENCHMARKS` ...) stay in their modules.
import importlib
import inspect

import fastai.vision.all  # noqa: F401
from .data import *
from .probe import *
from .features import *
from .evaluate import *
from .callbacks import *
from .classifier import *
from .models import *
from .learner import *
from .algorithms import *
from .checkpoint import *
from .train import *

MODULES = ('data.core', 'data.download', 'data.benchmarks', 'data.transforms', 'data.tasks', 'data.block', 'probe',
           'features', 'evaluate', 'callbacks', 'classifier', 'models', 'learner', 'algorithms', 'checkpoint', 'train')
__all__ = [n for m in MODULES for n in importlib.import_module(f'fsmtl.{m}').__all__
           if inspect.isclass(globals()[n]) or inspect.isfunction(globals()[n])]
