"Files fsmtl writes: one atomic writer, and the lock of a run folder."
from __future__ import annotations
import errno
import fcntl
import os
import socket
from pathlib import Path

__all__ = ['write_atomic', 'RunLock']


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
