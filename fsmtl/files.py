"Files fsmtl writes and reads: one atomic writer, the lock of a run folder, and the reader of torch files."
from __future__ import annotations
import errno
import fcntl
import os
import socket
import zipfile
from pathlib import Path

import torch

__all__ = ['write_atomic', 'RunLock', 'read_torch_file']


def write_atomic(path,  # the file to write
                 data   # bytes, str (written as UTF-8), or a function that writes to an open binary file
                 ) -> Path:
    "Write `data` to `path` atomically."
    # through a temporary file in the same folder, renamed only once complete and synced: never a half-written
    # file; a full disk is named
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.part')
    try:
        with open(tmp, 'wb') as f:
            if callable(data): data(f)
            else: f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"no space left on {path.parent} while writing {path.name}: the file there is as it was. "
                                   "Free some space, then run again") from e
        raise
    return path


class RunLock:
    "An exclusive lock on a run folder for the life of a run."
    # a second run of the folder is refused; a dead run's lock is free
    def __init__(self, folder):  # the run folder
        self.folder = Path(folder)
        self.path, self.file = self.folder / '.lock', None

    def __enter__(self):
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        f = open(self.path, 'a+')
        # an flock dies with its process, even under kill -9: a lock file left behind never blocks a later run
        try: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or 'another process'
            f.close()
            raise RuntimeError(f"the run folder {self.folder} is in use by another run ({holder}): wait for it to end, "
                               "or give this run another run_name") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self.file = f
        return self

    def __exit__(self, *exc):
        # a run that failed before writing anything leaves no folder behind
        if self.created and [p.name for p in self.folder.iterdir()] == [self.path.name]:
            self.path.unlink()
            self.folder.rmdir()
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
        self.file = None


def read_torch_file(path,      # a file torch.save wrote
                    what: str,  # what the file should be, for messages
                    fix: str):  # what to do instead, for messages
    "A file torch.save wrote, loaded with `weights_only`; a clear error for any other file."
    path = Path(path).expanduser()
    if not path.is_file(): raise FileNotFoundError(f"No {what} file {path}")
    size = path.stat().st_size
    if size == 0: raise ValueError(f"Cannot read {what} {path}: the file is empty (0 bytes); {fix}")
    with open(path, 'rb') as f: head = f.read(4)
    # torch.save writes a zip archive; torch before 1.6 a pickle (protocol 2 starts with 0x80)
    if not (head.startswith(b'PK') or head.startswith(b'\x80')):
        raise ValueError(f"Cannot read {what} {path}: it is not a file torch.save wrote ({size} bytes starting "
                         f"{head!r}); {fix}")
    try: return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        if b'fastai.learner' in _pickle_of(path):
            raise ValueError(f"{path} is a fastai Learner saved by learn.export(), not an fsmtl {what}: turn it into a "
                             "classifier file with FewShotClassifier.from_learner(load_learner(path)).save('clf.pt'), "
                             "then use that file") from e
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"Cannot read {what} {path} ({size} bytes): {why}; {fix}") from e


def _pickle_of(path) -> bytes:
    "The pickle in the zip archive torch.save wrote to `path`, as bytes (never unpickled); empty when there is none."
    try:
        with zipfile.ZipFile(path) as z: return next((z.read(n) for n in z.namelist() if n.endswith('/data.pkl')), b'')
    except (zipfile.BadZipFile, OSError): return b''
