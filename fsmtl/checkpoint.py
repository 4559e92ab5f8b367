"Checkpoints of a training run: the best and the last, and resuming from the last."
from __future__ import annotations
import io
import random
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastai.callback.tracker import EarlyStoppingCallback, TrackerCallback
from fastcore.basics import store_attr
from fastcore.foundation import L
from torch import nn

from .distributed import broadcast_object, gather_objects, is_main, rank, unwrap, world
from .files import read_torch_file, write_atomic

__all__ = ['save_atomic', 'read_checkpoint', 'load_weights', 'load_run_weights', 'backbone_from_checkpoint', 'Checkpoints', 'rng_state',
           'set_rng_state', 'own_rng_state']


def save_atomic(obj,   # what to save: a state dict, or any object `torch.save` takes
                path   # the file to write
                ) -> Path:
    "`torch.save` `obj` to `path`, atomically."
    # through `write_atomic`: `path` is never left half written
    buf = io.BytesIO()
    torch.save(obj, buf)
    # serialised in memory first: a full disk then surfaces as an OSError that names the file, not a torch assertion
    return write_atomic(path, buf.getbuffer())


_FIX = "test or resume from the run's other checkpoint (best.pth or last.pth), or train again"


def read_checkpoint(path,                 # a checkpoint file, or a run folder
                    prefer: str = 'last',  # the file of a run folder: 'last' (to resume) or 'best' (to test)
                    what: str = 'checkpoint',  # what the file should be, for messages
                    fix: str = _FIX        # what to do instead, for messages
                    ) -> dict:
    "The checkpoint at `path`, a file or a run folder's `prefer`.pth."
    if prefer not in ('best', 'last'): raise ValueError(f"prefer is 'best' or 'last', got {prefer!r}")
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / f'{prefer}.pth').is_file():
            have = ', '.join(sorted(f.name for f in path.glob('*.pth'))) or 'no checkpoint'
            raise FileNotFoundError(f"No {prefer}.pth in the run folder {path} (it holds {have})")
        path = path / f'{prefer}.pth'
    return read_torch_file(path, what, fix)


def load_weights(module: nn.Module,  # the model to fill
                 state: dict,        # its state dict, as read from a file
                 source,             # where `state` came from, for the message
                 show: int = 4):     # differing parameters named in the message, at most
    "`module.load_state_dict(state)`, or a `ValueError` on a misfit."
    # it names the first `show` parameters that are missing, extra or of another shape
    own = module.state_dict()
    diffs = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model" for k, v in own.items()
             if k in state and hasattr(state[k], 'shape') and state[k].shape != v.shape]
    diffs += [f"{k}: missing from the file" for k in own if k not in state]
    diffs += [f"{k}: not in the model" for k in state if k not in own]
    if diffs:
        more = f"\n  ... and {len(diffs) - show} more" if len(diffs) > show else ''
        raise ValueError(f"the weights in {source} do not fit this {type(module).__name__} ({len(diffs)} parameters differ: "
                         "another architecture or other arch_kwargs?):\n  " + '\n  '.join(diffs[:show]) + more)
    module.load_state_dict(state)


def load_run_weights(model: nn.Module,  # a model with a `backbone` and a `head`
                     st: dict,           # a checkpoint read by `read_checkpoint`
                     source):            # where `st` came from, for messages
    "Put checkpoint `st`'s backbone, and its head when it fits, into `model`."
    load_weights(model.backbone, st['backbone'], source)
    if 'head' in st and st['head'].shape == model.head.shape:
        with torch.no_grad(): model.head.copy_(st['head'])


def backbone_from_checkpoint(st: dict,  # a checkpoint read by `read_checkpoint`
                             source     # its file, for messages
                             ) -> nn.Module:
    "The backbone of checkpoint `st`, rebuilt with its weights."
    # rebuilt by timm from the checkpoint's `arch` and `arch_kwargs`
    from .models import create_backbone
    missing = [k for k in ('arch', 'backbone') if not isinstance(st, dict) or k not in st]
    if missing:
        raise ValueError(f"{source} is a torch file but not an fsmtl checkpoint (it has no {' or '.join(missing)}): give "
                         "a run's best.pth or last.pth, a saved FewShotClassifier, or a run folder")
    backbone, _ = create_backbone(st['arch'], **(st.get('arch_kwargs') or {}))
    load_weights(backbone, st['backbone'], source)
    return backbone


def rng_state() -> dict:
    "The states of all random generators, as plain types and tensors."
    # Python's, numpy's and torch's, and CUDA's when there is one. Not fastai's `get_random_states`: its numpy state holds
    # an ndarray, which a `weights_only` load refuses, and it also sets cudnn's flags, which are the run's, not its luck
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    st = dict(python=random.getstate(), numpy=(kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
              torch=torch.get_rng_state())
    if torch.cuda.is_available(): st['cuda'] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict):  # the states `rng_state` returned
    "Restore the generators' states saved by `rng_state`."
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in st['python']))
    kind, keys, pos, has_gauss, gauss = st['numpy']
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(st['torch'])
    if 'cuda' in st and torch.cuda.is_available(): torch.cuda.set_rng_state_all(st['cuda'])


def own_rng_state(st: dict  # a `last.pth` read by `read_checkpoint`
                  ) -> dict:
    "This process's generator states in the `last.pth` `st`."
    # a `ValueError` with the fix when its run had another number of processes
    states = st.get('rng_ranks') or [st['rng']]
    if len(states) != world():
        raise ValueError(f"this run was trained on {len(states)} process(es) and is resumed on {world()}: resume it on "
                         f"{len(states)} (torchrun --nproc_per_node {len(states)}), each drawing the tasks it would have drawn")
    return states[rank()]


def _tree(o):
    "`o` with fastcore's `L` and numpy scalars as the plain types `weights_only` admits."
    # both are in fastai's optimiser states
    if isinstance(o, dict): return {k: _tree(v) for k, v in o.items()}
    if isinstance(o, (list, L)): return [_tree(v) for v in o]
    if isinstance(o, tuple): return tuple(_tree(v) for v in o)
    return o.item() if isinstance(o, np.generic) else o   # fastai's schedules set hyper-parameters as numpy floats


def _float(v):
    "A history value as a plain float (or None), as `weights_only` loading admits."
    return None if v is None else float(v)


class Checkpoints(Callback):
    "Writes `last.pth` each epoch, `best.pth` when `monitor` improves; resumes a run from its `last.pth`."
    # last.pth: model, optimiser, schedule, RNG and history
    order = EarlyStoppingCallback.order + 1   # after the trackers: their updated state is saved, and restored after their reset

    def __init__(self,
                 path,                       # the run's folder
                 meta: dict | None = None,   # saved in both files: what rebuilds the backbone (arch, size, mean, std) and the config
                 monitor: str = 'episodic_acc',  # the metric whose highest value makes the best checkpoint
                 last: dict | None = None):      # a `last.pth` read by `read_last`: the run goes on from it (`resume`)
        store_attr()
        self.path, self.meta = Path(path), dict(meta or {})
        self.best, self.saved_epochs = -float('inf'), 0

    @property
    def last_path(self): return self.path / 'last.pth'
    @property
    def best_path(self): return self.path / 'best.pth'
    @property
    def start_epoch(self) -> int:
        "The epoch the fit starts at: the last checkpoint's when resuming, else 0."
        return self.last['epoch'] if self.last is not None else 0

    @staticmethod
    def read_last(folder  # the folder of the run to resume
                  ) -> dict:
        "The `last.pth` of the run in `folder`, checked to resume on this number of processes."
        # read before any work: a run resumed on another number of processes fails at once, naming the fix
        st = read_checkpoint(folder, prefer='last')
        own_rng_state(st)
        return st

    def resume(self):
        "Continue the run from `last`: its weights and optimiser now, the rest when the fit starts."
        # the rest: history, schedule, trackers and RNG, restored in `before_fit` after the trackers' reset
        if self.last is None: return
        load_run_weights(unwrap(self.learn.model), self.last, self.last_path)
        self.learn.create_opt()
        self.learn.opt.load_state_dict(self.last['opt'])

    def load_best(self,
                  model: nn.Module  # the trained model
                  ) -> dict | None: # the best checkpoint, or None when there is none
        "Put the best checkpoint's weights into `model`, on every process."
        best = broadcast_object(read_checkpoint(self.best_path) if is_main() and self.best_path.exists() else None)
        if best is not None: load_run_weights(model, best, self.best_path)
        return best

    def history(self) -> pd.DataFrame:
        "One row per epoch: the learner's, or the last checkpoint's when no epoch was left to train."
        rec, last = self.learn.recorder, self.last or {}
        # the Recorder has metric names once a fit has started; it keeps no time in its values
        names, values = (rec.metric_names, rec.values) if hasattr(rec, 'metric_names') else \
            (last.get('metric_names', ['epoch']), last.get('history', []))
        return pd.DataFrame(values, columns=[n for n in names[1:] if n != 'time']).rename_axis('epoch')

    def before_fit(self):
        self.run = not hasattr(self.learn, 'lr_finder')
        if not self.run: return
        self.best, self.saved_epochs = -float('inf'), 0
        if self.last is not None: self._restore(self.last)

    def _restore(self, st):
        "Put back what `last.pth` holds beyond the weights and optimiser."
        # history, schedule, best value and RNG
        rec = self.learn.recorder
        if list(st['metric_names']) != list(rec.metric_names):
            raise ValueError(f"the checkpoint's metrics {st['metric_names']} differ from this learner's {list(rec.metric_names)}: "
                             "resume with the configuration the run was started with")
        rec.values = [list(v) for v in st['history']]
        # the training loss column is a running average across epochs: it goes on from where it was
        rec.smooth_loss.count, rec.smooth_loss.val = st['smooth_loss']
        self.best, self.saved_epochs = st['best'], st['epoch']
        for cb, state in zip(self._trackers(), st['trackers']):
            cb.best, cb.wait = state['best'], state.get('wait', 0)
        self.learn.opt.set_hypers(lr=st['lr'])
        set_rng_state(own_rng_state(st))

    def _trackers(self): return [cb for cb in self.learn.cbs if isinstance(cb, TrackerCallback)]

    def _value(self):
        names = list(self.learn.recorder.metric_names[1:])
        if self.monitor not in names: raise ValueError(f"Checkpoints monitors {self.monitor!r}, which is not among {names}")
        return self.learn.recorder.values[-1][names.index(self.monitor)]

    def _state(self, epoch: int, value) -> dict:
        model = unwrap(self.learn.model)
        return dict(self.meta, epoch=epoch, monitor=self.monitor, value=_float(value),
                    backbone={k: v.detach().cpu() for k, v in model.backbone.state_dict().items()},
                    head=model.head.detach().cpu(), metric_names=list(self.learn.recorder.metric_names),
                    history=[[_float(x) for x in v] for v in self.learn.recorder.values])

    def after_epoch(self): self._save()

    def after_cancel_fit(self):
        # early stopping cancels the fit in its after_epoch, before this callback's runs
        if self.run and len(self.learn.recorder.values) > self.saved_epochs: self._save()

    def _save(self):
        if not self.run: return
        epoch, value = len(self.learn.recorder.values), self._value()
        # every process's generators, each resumed by its own process; only rank 0 writes
        rngs = gather_objects(rng_state())
        better = value is not None and not np.isnan(value) and value > self.best
        if better: self.best = float(value)
        if is_main(): self._write(epoch, value, better, rngs)
        self.saved_epochs = epoch

    def _write(self, epoch, value, better, rngs):
        st = self._state(epoch, value)
        if better: save_atomic(st, self.best_path)
        sl, opt = self.learn.recorder.smooth_loss, self.learn.opt
        # the best file is the last one's weights and history; the last adds what resuming needs
        last = dict(st, opt=_tree(opt.state_dict()), lr=float(opt.hypers[-1]['lr']), best=self.best, rng=rngs[0],
                    smooth_loss=(sl.count, torch.as_tensor(sl.val).detach().cpu()),
                    trackers=[dict(best=_float(cb.best), wait=getattr(cb, 'wait', 0)) for cb in self._trackers()])
        if len(rngs) > 1: last['rng_ranks'] = rngs
        save_atomic(last, self.last_path)
