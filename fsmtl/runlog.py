"Logging of a training run: the CSV history (resumable), TensorBoard when installed, wandb (offline unless logged in), JSON files."
from __future__ import annotations
import json
import math
import netrc
import os
from pathlib import Path

from fastai.callback.progress import CSVLogger

__all__ = ['RunCSVLogger', 'tensorboard_cb', 'wandb_cb', 'wandb_mode', 'write_json']


class RunCSVLogger(CSVLogger):
    "fastai's `CSVLogger` that, when appending to a resumed run's file, keeps its header and first `keep` rows and adds no header."
    def __init__(self, fname='history.csv', append=False, keep: int = 0):
        super().__init__(fname, append)
        self.keep = keep

    def before_fit(self):
        f = self.path / self.fname
        if not (self.append and f.is_file()): return super().before_fit()
        # rows of epochs after the last checkpoint are trained again, so they go
        lines = f.read_text().splitlines(keepends=True)[:1 + self.keep]
        f.write_text(''.join(lines))
        self.file = f.open('a')
        self.old_logger, self.learn.logger = self.logger, self._write_line


def tensorboard_cb(log_dir):
    "A TensorBoard callback writing to `log_dir` when the tensorboard package is installed, else None."
    try: from fastai.callback.tensorboard import TensorBoardCallback
    except ImportError: return None

    class TensorBoard(TensorBoardCallback):
        "fastai's TensorBoard callback, leaving out values that are missing (no validation loss on novel classes)."
        def after_epoch(self):
            for n, v in zip(self.recorder.metric_names[2:-1], self.recorder.log[2:-1]):
                if v is not None and not (isinstance(v, float) and math.isnan(v)): self.writer.add_scalar(n, v, self.train_iter)

    return TensorBoard(log_dir=str(log_dir), trace_model=False, log_preds=False)


def wandb_mode() -> str:
    "`WANDB_MODE` when set; else 'online' when the user has logged in to wandb (an API key in the environment or ~/.netrc), else 'offline'."
    if os.environ.get('WANDB_MODE'): return os.environ['WANDB_MODE']
    if os.environ.get('WANDB_API_KEY'): return 'online'
    try: hosts = netrc.netrc(os.environ.get('NETRC')).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError): hosts = {}
    return 'online' if any('wandb' in h for h in hosts) else 'offline'


def wandb_cb(run_dir, config: dict, name: str):
    "Start a wandb run in `run_dir` (mode from `wandb_mode`) and return fastai's WandbCallback for it."
    try:
        import wandb
        from fastai.callback.wandb import WandbCallback
    except ImportError as e:
        raise ImportError("wandb logging needs the wandb package: pip install 'fsmtl[wandb]' (or wandb==0.31.0)") from e
    wandb.init(project='fsmtl', name=name, dir=str(run_dir), config=config, mode=wandb_mode(), reinit='finish_previous')
    return WandbCallback(log_preds=False, log_model=False)


def write_json(obj, path):
    "Write `obj` as indented JSON to `path` through a temporary file."
    path = Path(path)
    tmp = path.with_name(path.name + '.part')
    tmp.write_text(json.dumps(obj, indent=2, default=str) + '\n')
    os.replace(tmp, path)
