"Downloads against a local HTTP server (checksum, web pages, resume, mirrors, offline) and the restricted unpickler."
import collections
import hashlib
import io
import os
import pickle
import socket

import numpy as np
import pytest

from fsmtl.data.download import DataError, DataUnavailable, download_url, fetch, safe_load_pickle

DATA = bytes(range(256)) * 4000 + b'tail'  # a little over 1 MiB, so it takes more than one read chunk
MD5 = hashlib.md5(DATA).hexdigest()


def _part(path): return path.with_name(path.name + '.part')


def test_download_with_md5(server, tmp_path):
    server.files['f.bin'] = DATA
    dest = download_url(server.url('f.bin'), tmp_path / 'sub' / 'f.bin', md5=MD5, progress=True)
    assert dest.read_bytes() == DATA
    assert not _part(dest).exists()


def test_wrong_md5_keeps_nothing(server, tmp_path):
    server.files['f.bin'] = DATA
    dest = tmp_path / 'f.bin'
    with pytest.raises(DataError) as e: download_url(server.url('f.bin'), dest, md5='0' * 32, progress=False)
    assert 'f.bin' in str(e.value) and '0' * 32 in str(e.value) and MD5 in str(e.value)
    assert 'download it afresh' in str(e.value)
    assert not dest.exists() and not _part(dest).exists()


@pytest.mark.parametrize('content_type', ['text/html', 'application/octet-stream'])
def test_web_page_instead_of_file(server, tmp_path, content_type):
    dest = tmp_path / 'f.pkl'
    if content_type == 'text/html': server.html.add('f.pkl')
    else: server.files['f.pkl'] = b'\n  <!DOCTYPE html><html><body>Sign in</body></html>'  # sniffed from the bytes alone
    with pytest.raises(DataError, match='web page') as e: download_url(server.url('f.pkl'), dest, progress=False)
    assert str(dest) in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_download_resumes(server, tmp_path):
    server.files['f.bin'] = DATA
    server.cut['f.bin'] = len(DATA) // 2
    dest = tmp_path / 'f.bin'
    with pytest.raises(DataError, match='resume'): download_url(server.url('f.bin'), dest, md5=MD5, progress=False)
    assert not dest.exists()
    assert _part(dest).read_bytes() == DATA[:len(DATA) // 2]
    download_url(server.url('f.bin'), dest, md5=MD5, progress=False)
    assert server.requests[-1] == ('f.bin', f'bytes={len(DATA) // 2}-')
    assert hashlib.md5(dest.read_bytes()).hexdigest() == MD5
    assert not _part(dest).exists()


def test_server_ignoring_range_restarts(server, tmp_path):
    server.files['f.bin'] = DATA
    server.ignore_range = True
    dest = tmp_path / 'f.bin'
    _part(dest).write_bytes(b'x' * 1000)  # appending the whole file to this would corrupt it
    download_url(server.url('f.bin'), dest, md5=MD5, progress=False)
    assert server.requests[-1][1] == 'bytes=1000-'
    assert dest.read_bytes() == DATA


def test_part_longer_than_file_restarts(server, tmp_path):
    server.files['f.bin'] = DATA
    dest = tmp_path / 'f.bin'
    _part(dest).write_bytes(b'x' * (len(DATA) + 10))
    download_url(server.url('f.bin'), dest, md5=MD5, progress=False)
    assert dest.read_bytes() == DATA


def _unused_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_offline_names_every_missing_file(tmp_path):
    base = f'http://127.0.0.1:{_unused_port()}/'
    res = [('a.pkl', [base + 'a.pkl', base + 'mirror/a.pkl'], None), ('b.tar.gz', [base + 'b.tar.gz'], MD5)]
    with pytest.raises(DataUnavailable) as e: fetch(res, tmp_path / 'data', progress=False)
    msg = str(e.value)
    for part in ['a.pkl', 'b.tar.gz', base + 'a.pkl', base + 'mirror/a.pkl', base + 'b.tar.gz', str(tmp_path / 'data')]:
        assert part in msg
    assert isinstance(e.value, FileNotFoundError)


def test_stopped_server_is_offline(server, tmp_path):
    server.files['a.pkl'] = DATA
    url = server.url('a.pkl')
    server.stop()
    with pytest.raises(DataUnavailable, match='a.pkl'): fetch([('a.pkl', [url], None)], tmp_path, progress=False)


def test_no_download_names_missing_files(server, tmp_path):
    server.files['a.pkl'] = DATA
    (tmp_path / 'b.pkl').write_bytes(DATA)
    res = [('a.pkl', [server.url('a.pkl')], None), ('b.pkl', [server.url('b.pkl')], None)]
    with pytest.raises(DataUnavailable) as e: fetch(res, tmp_path, download=False)
    msg = str(e.value)
    assert 'a.pkl' in msg and server.url('a.pkl') in msg and str(tmp_path) in msg and 'download=False' in msg
    assert 'b.pkl' not in msg
    assert server.requests == []


def test_fetch_falls_back_to_mirror(server, tmp_path):
    server.files['good/a.bin'] = DATA
    server.html.add('bad/a.bin')
    paths = fetch([('a.bin', [server.url('bad/a.bin'), server.url('good/a.bin')], MD5)], tmp_path, progress=False)
    assert paths == [tmp_path / 'a.bin'] and paths[0].read_bytes() == DATA
    assert [r[0] for r in server.requests] == ['bad/a.bin', 'good/a.bin']


def test_fetch_checks_existing_file(server, tmp_path):
    (tmp_path / 'a.bin').write_bytes(DATA[:-1])
    with pytest.raises(DataError, match=MD5): fetch([('a.bin', [server.url('a.bin')], MD5)], tmp_path)
    (tmp_path / 'a.bin').write_bytes(DATA)
    assert fetch([('a.bin', [server.url('a.bin')], MD5)], tmp_path) == [tmp_path / 'a.bin']
    assert server.requests == []


class _Evil:
    def __init__(self, fn, arg): self.fn, self.arg = fn, arg
    def __reduce__(self): return self.fn, (self.arg,)


@pytest.mark.parametrize('fn, name', [(os.system, 'system'), (eval, 'builtins.eval')])
def test_unpickler_refuses_code(tmp_path, fn, name):
    marker = tmp_path / 'pwned'
    payload = pickle.dumps({'image_data': _Evil(fn, f'open({str(marker)!r}, "w")' if fn is eval else f'touch {marker}')})
    with pytest.raises(pickle.UnpicklingError, match=name): safe_load_pickle(io.BytesIO(payload))
    assert not marker.exists()
    assert pickle.loads(payload) is not None and marker.exists()  # the payload is live: plain pickle runs it


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_unpickler_loads_numpy(tmp_path, protocol):
    obj = {'image_data': np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3), 'labels': np.array([3, -1], np.int32),
           'empty': np.zeros((0, 4), np.float32), 'scalar': np.float64(2.5), 'names': ['a', b'b'],
           'record': np.zeros(2, dtype=[('x', '<i4'), ('y', '<f8')]), 'ordered': collections.OrderedDict(k=(1, 2.0))}
    (tmp_path / 'p.pkl').write_bytes(pickle.dumps(obj, protocol=protocol))
    got = safe_load_pickle(tmp_path / 'p.pkl')
    for k in ('image_data', 'labels', 'empty', 'record'):
        assert got[k].dtype == obj[k].dtype and np.array_equal(got[k], obj[k])
    assert got['scalar'] == 2.5 and got['names'] == ['a', b'b'] and got['ordered'] == obj['ordered']


def test_unpickler_loads_old_numpy_names():
    "Pickles written by numpy 1 (and Python 2) name numpy.core, not numpy._core."
    payload = pickle.dumps({'x': np.arange(5, dtype=np.int32), 's': np.int64(7)}, protocol=2)
    old = payload.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
    assert old != payload
    got = safe_load_pickle(io.BytesIO(old))
    assert np.array_equal(got['x'], np.arange(5)) and got['s'] == 7
