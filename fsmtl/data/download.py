"Downloads that resume and try each mirror, and unpickling of numpy arrays only."
from __future__ import annotations
import hashlib
import http.client
import os
import pickle
import urllib.error
import urllib.request
from pathlib import Path
from typing import NamedTuple

from fastprogress.fastprogress import progress_bar

__all__ = ['Resource', 'DataError', 'DataUnavailable', 'md5sum', 'download_url', 'fetch', 'safe_load_pickle']

_CHUNK = 1 << 20


class Resource(NamedTuple):
    "A data file: its name, its mirrors and its published md5."
    name: str               # file name inside the data folder
    urls: list              # mirrors, tried in order
    md5: str | None = None  # hex md5 of the whole file; None where none is published


class DataError(RuntimeError):
    "A data file is corrupt, incomplete, or not the file expected."


class DataUnavailable(FileNotFoundError):
    "Data files are missing and could not be downloaded."


def md5sum(
    path,  # the file to hash
) -> str:
    "The md5 hex digest of the file at `path`."
    h = hashlib.md5()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(_CHUNK), b''): h.update(chunk)
    return h.hexdigest()


def _is_html(content_type, head):
    "Whether a response is a web page rather than the file."
    # file-sharing sites answer with one for confirmations, logins and dead links
    start = head[:512].lstrip().lower()
    return content_type == 'text/html' or start.startswith((b'<!doctype html', b'<html'))


def _md5_message(path, expected, actual, url):
    return (f"{path} has md5 {actual} but {expected} was expected: the file is corrupt, incomplete or not the one "
            f"published. Delete it if it is still there and run again to download it afresh from {url}.")


def download_url(
    url,            # the file's address (http or https)
    dest,           # where the file ends up; the download goes to `dest` + '.part' first
    md5=None,       # hex md5 the whole file must have; None skips the check
    progress=True,  # show a fastprogress bar
    timeout=30,     # seconds to wait for the server before giving up
) -> Path:
    "Download `url` to `dest`, resuming a partial file; checks `md5`."
    dest = Path(dest)
    part = dest.with_name(dest.name + '.part')
    dest.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    headers = {'User-Agent': 'fsmtl'}
    if have: headers['Range'] = f'bytes={have}-'
    try: resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        # 416: the server cannot continue from the partial file (already whole, or longer than the file), so start over
        if e.code != 416 or not have: raise
        part.unlink()
        return download_url(url, dest, md5, progress, timeout)
    with resp:
        if resp.status != 206: have = 0  # a server that ignores Range sends the whole file again
        length = resp.headers.get('Content-Length')
        total = have + int(length) if length is not None else None
        head = resp.read(_CHUNK)
        if _is_html(resp.headers.get_content_type(), b'' if have else head):
            raise DataError(f"A web page came from {url} instead of the data file {dest.name}; nothing was kept. "
                            f"File-sharing sites do this when they want a confirmation or a login, or when the link "
                            f"is dead. Download the file in a browser and put it at {dest}.")
        done = have + len(head)
        pbar = progress_bar(range(total), leave=False) if progress and total else None
        if pbar:
            pbar.comment = dest.name
            pbar.update(0)
        with open(part, 'ab' if have else 'wb') as f:
            f.write(head)
            try:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if pbar: pbar.update(done)
            except (OSError, http.client.HTTPException) as e:
                raise DataError(f"The download of {dest.name} from {url} broke off after {done} bytes ({e}). "
                                f"The partial file {part} is kept: run again to resume.") from e
    # urllib returns a short body without complaint when the connection closes early
    if total is not None and done != total:
        raise DataError(f"The download of {dest.name} from {url} stopped after {done} of {total} bytes. "
                        f"The partial file {part} is kept: run again to resume.")
    if md5 is not None and (got := md5sum(part)) != md5:
        part.unlink()
        raise DataError(_md5_message(dest, md5, got, url))
    os.replace(part, dest)  # only now, once `md5` matched, is the file at `dest`
    return dest


def fetch(
    resources,      # `Resource`s or (file name, mirror urls, md5 or None) tuples
    folder,         # the data folder the files live in
    download=True,  # download missing files; False only reports them
    progress=True,  # show a progress bar per download
) -> list:
    "Paths in `folder` of `resources`, downloading the missing ones."
    folder = Path(folder).expanduser()
    resources = [Resource(*r) for r in resources]
    failed = []  # (resource, why) pairs
    for r in resources:
        dest = folder / r.name
        if dest.exists():
            # a file put there by hand has had no other check
            if r.md5 is not None and (got := md5sum(dest)) != r.md5:
                raise DataError(_md5_message(dest, r.md5, got, r.urls[0]))
            continue
        if not download:
            failed.append((r, ['not downloaded: download=False']))
            continue
        reasons = []
        for url in r.urls:
            try:
                download_url(url, dest, r.md5, progress)
                break
            except (OSError, http.client.HTTPException, DataError) as e: reasons.append(f'{url}: {e}')
        else: failed.append((r, reasons))
    if failed:  # one error names every file that could not be got
        lines = [f"Missing data file(s) in {folder}:"]
        for r, reasons in failed:
            lines.append(f"  {r.name}  (from {' or '.join(r.urls)})")
            lines += [f"      {why}" for why in reasons]
        lines.append(f"Download each file by hand from one of its urls and put it, under that name, in the folder "
                     f"{folder} ; then run again.")
        raise DataUnavailable('\n'.join(lines))
    return [folder / r.name for r in resources]


_NUMPY_GLOBALS = {
    ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
    ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
    ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
    ('numpy', 'ndarray'), ('numpy', 'dtype'), ('_codecs', 'encode'), ('collections', 'OrderedDict'),
    # protocol 2 spells an empty bytes object (the data of an empty array) as a call of bytes()
    ('__builtin__', 'bytes'), ('builtins', 'bytes'),
}


class _NumpyUnpickler(pickle.Unpickler):
    "An unpickler of numpy arrays and plain containers; it refuses every other global."
    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS: return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle the global {module}.{name}: "
                                     "only numpy arrays, numpy scalars and plain containers are allowed")


def safe_load_pickle(
    path_or_file,       # a path, or a file opened in binary mode
    encoding='latin1',  # how Python 2 str become str; 'latin1' keeps the bytes of numpy arrays intact
):
    "Unpickle `path_or_file`: only numpy data and plain containers."
    # numpy arrays and scalars, lists, dicts ...: a bad file cannot run code
    if isinstance(path_or_file, (str, os.PathLike)):
        with open(path_or_file, 'rb') as f: return _NumpyUnpickler(f, encoding=encoding).load()
    return _NumpyUnpickler(path_or_file, encoding=encoding).load()
