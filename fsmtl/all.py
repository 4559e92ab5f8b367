"The notebook surface: `from fsmtl.all import *`, fsmtl's public functions and classes."
# fastai's own surface (`Learner.fit_one_cycle`, `show_batch` ...) is patched in on import; `from fastai.vision.all
# import *` brings its names. Constants (`ALIASES`, `BENCHMARKS` ...) stay in their modules; the optional logging
# integrations (wandb, TensorBoard) stay in `fsmtl.runlog`.
import importlib
import inspect

import fastai.vision.all  # noqa: F401

MODULES = ('data.core', 'data.download', 'data.images', 'data.benchmarks', 'data.transforms', 'data.tasks',
           'data.block', 'probe', 'features', 'scoring', 'adapt', 'evaluate', 'callbacks', 'classifier', 'models', 'pretrained',
           'distributed', 'ddp', 'heads', 'algorithms', 'learner', 'files', 'checkpoint', 'train', 'data.torchvision_domains', 'domains')
_public = {n: getattr(m, n) for m in (importlib.import_module(f'fsmtl.{name}') for name in MODULES) for n in m.__all__}
globals().update(_public)
__all__ = [n for n, o in _public.items() if inspect.isclass(o) or inspect.isfunction(o)]
