"A run's folder: its name inside `log_dir`, the files that make it a run's, and what a resume may change."
from __future__ import annotations
import errno
import json
import time
from contextlib import contextmanager
from pathlib import Path

__all__ = ['RUN_FILES', 'RESUME_MAY_CHANGE', 'run_folder', 'check_unused', 'resume_hint', 'resume_source', 'resumed_config']

# what a run writes in its folder: a folder holding any of them holds a run, which a new run must not overwrite
RUN_FILES = ('last.pth', 'best.pth', 'results.json', 'history.csv', 'config.json', 'tensorboard', 'wandb')
# options a resumed run may change: where things are, how it is shown and logged, its final test, and more epochs;
# any other changes how the remaining epochs train, so the run would no longer be one run
RESUME_MAY_CHANGE = ('root', 'log_dir', 'run_name', 'gpu', 'num_workers', 'progress', 'no_log', 'wandb', 'baseline',
                     'test_episodes', 'max_epochs')


def run_folder(cfg: dict  # a run's options by name (`option_values`): log_dir, run_name, dataset, arch
               ) -> Path:
    "The folder of a run: `log_dir`/`run_name`, by default dataset-arch-date-time."
    # a dataset like 'torchvision:EuroSAT' or 'folder:/data/x' becomes one plain folder name
    dataset = ''.join(c if c.isalnum() or c in '.-_' else '-' for c in str(cfg['dataset'])).strip('-')
    name = cfg['run_name'] or f"{dataset}-{cfg['arch']}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not isinstance(name, str) or Path(name).name != name or name == '..':
        raise ValueError(f"run_name must be the name of one folder in log_dir, got {name!r}: give a name without '/' "
                         "(such as 'mtl-5shot'), and choose where runs go with log_dir")
    # absolute, because fastai's loggers put relative names under the learner's path
    return (Path(cfg['log_dir']).expanduser() / name).resolve()


def check_unused(folder: Path):  # the folder of a new run
    "A `FileExistsError` naming the run files `folder` holds, if any."
    if not (held := [f for f in RUN_FILES if (folder / f).exists()]): return
    fix = ("resume it (resume=True, --resume)" if 'last.pth' in held else
           "it has no last.pth to resume from: delete the folder to start it again")
    raise FileExistsError(f"{folder} already holds a run ({', '.join(held)}): {fix}, or give this run another run_name")


@contextmanager
def resume_hint(folder: Path):  # the run's folder
    "Add to a full disk's error whether the run in `folder` can be resumed."
    try: yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT): raise
        again = ("continue it with --resume (resume=True)" if (folder / 'last.pth').is_file() else
                 f"nothing was saved to resume from: delete {folder} and start the run again")
        raise OSError(e.errno, f"{e.strerror}; {again}") from e


def resume_source(cfg: dict  # the options given to resume, by name: load_path, run_name, log_dir
                  ) -> Path:
    "The run folder to resume."
    # `load_path`'s, else `log_dir`/`run_name`, else the run in `log_dir` whose last checkpoint is newest
    if cfg['load_path']:
        p = Path(cfg['load_path']).expanduser().resolve()
        folder = p if p.is_dir() else p.parent
    elif cfg['run_name']: folder = run_folder(cfg)
    else:
        runs = sorted(Path(cfg['log_dir']).expanduser().glob('*/last.pth'), key=lambda f: f.stat().st_mtime)
        if not runs: raise FileNotFoundError(f"resume: no run with a last.pth in {cfg['log_dir']}; name the run to resume "
                                             "with --load_path (load_path=) or --run_name (run_name=)")
        folder = runs[-1].parent.resolve()
    if not (folder / 'last.pth').is_file():
        raise FileNotFoundError(f"nothing to resume in {folder}: it holds no last.pth (a run writes one after its first "
                                f"epoch); start the run again without resume, under another run_name or after deleting it")
    return folder


def _plain(v):
    "`v` as JSON gives it back, so that a tuple and a list, or a path and a string, compare equal."
    return json.loads(json.dumps(v, default=str))


def resumed_config(given: dict,   # the options given to resume, by name (`renamed`)
                   old: dict,     # the run's own options, every one, by name (`option_values`)
                   folder: Path,  # the run's folder
                   epoch: int     # epochs in its last checkpoint
                   ) -> dict:
    "The options of a resumed run: its own, changed only where `RESUME_MAY_CHANGE`, each change recorded."
    # the run's own load_path (the weights it started from, if any) stays on its record
    changed = {k: v for k, v in given.items() if k not in ('resume', 'load_path') and _plain(v) != _plain(old[k])}
    if fixed := [k for k in changed if k not in RESUME_MAY_CHANGE]:
        was = ', '.join(f"--{k} {old[k]!r} (now {changed[k]!r})" for k in fixed)
        raise ValueError(f"resume continues a run with its own settings; it was trained with {was}, and another value "
                         f"would change how its remaining epochs train. Drop {', '.join('--' + k for k in fixed)}, or start "
                         f"a new run from its weights: --load_path {folder / 'last.pth'} without --resume")
    # finished: its results are of its last checkpoint (an older results.json stays while a longer run goes on)
    done = folder / 'results.json'
    if done.is_file() and json.loads(done.read_text()).get('epochs', epoch) == epoch and \
            changed.get('max_epochs', old['max_epochs']) <= old['max_epochs']:
        raise ValueError(f"{folder} holds a finished run (results.json): test it again with fsmtl test --load_path {folder}, "
                         f"or train it longer with --resume and --max_epochs above {old['max_epochs']}")
    # how the epochs before each resume were trained stays on record
    record = dict(epoch=epoch, changed=_plain({k: [old[k], v] for k, v in changed.items()}))
    return dict(old, **changed, resume=True, resumed=[*old.get('resumed', []), record])
