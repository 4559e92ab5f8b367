"Logs of a training run: the CSV history, TensorBoard, wandb and JSON files."
from __future__ import annotations
import json
import math
import netrc
import os

from fastai.callback.core import Callback
from fastai.callback.progress import CSVLogger, ProgressCallback
from fastai.callback.tracker import EarlyStoppingCallback
from fastcore.basics import noop

from .files import write_atomic

__all__ = ['quiet', 'RunCSVLogger', 'EpochTable', 'tensorboard_cb', 'wandb_cb', 'wandb_mode', 'write_json']


class RunCSVLogger(CSVLogger):
    "fastai's `CSVLogger`, writing an epoch's row only once its checkpoint is saved."
    # a resumed run keeps its first `keep` rows
    # after `Checkpoints` (EarlyStoppingCallback.order + 1): the history never holds an epoch the checkpoints lack
    order = EarlyStoppingCallback.order + 2

    def __init__(self,
                 fname='history.csv',  # the CSV file
                 append=False,         # append to the file (a resumed run)
                 keep: int = 0):       # rows of the file kept when appending: the epochs of the checkpoint resumed from
        super().__init__(fname, append)
        self.keep, self.pending = keep, None

    def _write_line(self, log): self.pending = log

    def after_epoch(self):
        if self.pending is not None: super()._write_line(self.pending)
        self.pending = None

    # early stopping cancels the fit before `after_epoch`; the checkpoint is written in its `after_cancel_fit` too
    after_cancel_fit = after_epoch

    def before_fit(self):
        f = self.path / self.fname
        if not (self.append and f.is_file()): return super().before_fit()
        # rows of epochs after the last checkpoint are trained again, so they go
        lines = f.read_text().splitlines(keepends=True)[:1 + self.keep]
        f.write_text(''.join(lines))
        self.file = f.open('a')
        self.old_logger, self.learn.logger = self.logger, self._write_line


class EpochTable(Callback):
    "The epoch table of fastai's progress bars without the bars, for logs in files."
    # a header, then one line per epoch
    order = ProgressCallback.order

    def before_fit(self):
        if hasattr(self.learn, 'lr_finder') or hasattr(self.learn, 'gather_preds'): return
        self.old_logger, self.learn.logger = self.learn.logger, self._line
        self.widths = [max(len(n), 9) for n in self.recorder.metric_names]
        self._print(self.recorder.metric_names)

    def _line(self, log): self._print([f'{v:.6f}' if isinstance(v, float) else str(v) for v in log])

    def _print(self, cells): print('  '.join(f'{c:<{w}}' for c, w in zip(cells, self.widths)).rstrip(), flush=True)

    def after_fit(self):
        if hasattr(self, 'old_logger'): self.learn.logger = self.old_logger


def quiet(learn):  # a `Learner`
    "Remove `learn`'s progress bars or epoch table, and stop it printing each epoch's record."
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, (ProgressCallback, EpochTable))])
    learn.logger = noop
    return learn


def tensorboard_cb(log_dir):
    "A TensorBoard callback writing to `log_dir`; None without tensorboard."
    try: from fastai.callback.tensorboard import TensorBoardCallback
    except ImportError: return None

    class TensorBoard(TensorBoardCallback):
        "fastai's TensorBoard callback, leaving out missing values."
        # such as the validation loss, which there is none of on novel classes
        def after_epoch(self):
            for n, v in zip(self.recorder.metric_names[2:-1], self.recorder.log[2:-1]):
                if v is not None and not (isinstance(v, float) and math.isnan(v)): self.writer.add_scalar(n, v, self.train_iter)

    return TensorBoard(log_dir=str(log_dir), trace_model=False, log_preds=False)


def wandb_mode() -> str:
    "`WANDB_MODE` if set, else 'online' once logged in to wandb, else 'offline'."
    # logged in: an API key in the environment or in ~/.netrc
    if os.environ.get('WANDB_MODE'): return os.environ['WANDB_MODE']
    if os.environ.get('WANDB_API_KEY'): return 'online'
    try: hosts = netrc.netrc(os.environ.get('NETRC')).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError): hosts = {}
    return 'online' if any('wandb' in h for h in hosts) else 'offline'


def wandb_cb(run_dir, config: dict, name: str):
    "Start a wandb run in `run_dir`; return fastai's `WandbCallback` for it."
    try:
        import wandb
        from fastai.callback.wandb import WandbCallback
    except ImportError as e:
        raise ImportError("wandb logging needs the wandb package: pip install 'fsmtl[wandb]' (or wandb==0.31.0)") from e
    try: wandb.init(project='fsmtl', name=name, dir=str(run_dir), config=config, mode=wandb_mode(), reinit='finish_previous')
    except wandb.errors.Error as e:
        raise RuntimeError(f"wandb could not start a run in {wandb_mode()} mode ({e}): log in (wandb login), log offline "
                           "(WANDB_MODE=offline), or train without wandb") from e
    return WandbCallback(log_preds=False, log_model=False)


def write_json(obj,    # what to write: dicts, lists, numbers and strings (other values as their str)
               path):  # the file to write
    "Write `obj` as indented JSON to `path` through `write_atomic`."
    return write_atomic(path, json.dumps(obj, indent=2, default=str) + '\n')
