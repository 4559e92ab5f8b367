"Fixtures shared by the tests: a local HTTP server that stands in for the download mirrors."
import os
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch


class _Handler(BaseHTTPRequestHandler):
    "Serves the owner's `files`, honouring Range unless `ignore_range`; a web page for names in `html`; cuts `cut` names short once."
    def do_GET(self):
        srv, name = self.server.owner, self.path.lstrip('/')
        srv.requests.append((name, self.headers.get('Range')))
        if name in srv.html:
            page = b'<!DOCTYPE html><html><body>Google Drive can\'t scan this file for viruses.</body></html>'
            return self._send(200, page, {'Content-Type': 'text/html; charset=utf-8'})
        if name not in srv.files: return self._send(404, b'not found', {})
        data, start, headers = srv.files[name], 0, {'Content-Type': 'application/octet-stream'}
        rng = self.headers.get('Range')
        if rng and not srv.ignore_range:
            start = int(rng.split('=')[1].split('-')[0])
            if start >= len(data): return self._send(416, b'', {})
            headers['Content-Range'] = f'bytes {start}-{len(data) - 1}/{len(data)}'
        self._send(206 if start else 200, data[start:], headers, srv.cut.pop(name, None))

    def _send(self, code, body, headers, cut=None):
        self.send_response(code)
        for k, v in {**headers, 'Content-Length': str(len(body))}.items(): self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[:cut])

    def log_message(self, *args): pass


class LocalServer:
    "A `ThreadingHTTPServer` on 127.0.0.1 and a free port, serving the bytes put in `files`."
    def __init__(self):
        self.files, self.html, self.cut, self.requests, self.ignore_range = {}, set(), {}, [], False
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, name): return f'http://127.0.0.1:{self.httpd.server_address[1]}/{name}'

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = LocalServer()
    yield srv
    srv.stop()


@pytest.fixture(scope='session')
def glyph_root(tmp_path_factory):
    "A data folder holding the embedded glyphs benchmark's small setting ('glyphs-small'), rendered once for the whole session."
    from fsmtl.data.glyphs import SMALL_IMAGES, glyphs
    root = tmp_path_factory.mktemp('glyph-data')
    glyphs(root, n_images=SMALL_IMAGES, progress=False)
    return root


@pytest.fixture(scope='session')
def glyph_splits(glyph_root):
    "The embedded glyphs benchmark's small setting (`FewShotSplits`), read from `glyph_root`."
    from fsmtl.data.glyphs import SMALL_IMAGES, glyphs
    return glyphs(glyph_root, n_images=SMALL_IMAGES, progress=False)


# Torch threads of the tests that train: one, unless FSMTL_TEST_THREADS says otherwise (the margins are checked under 1 and 2).
TEST_THREADS = int(os.environ.get('FSMTL_TEST_THREADS', '1'))
# and of every process a test starts (the shell commands, torchrun's workers, the benches): two workers on two cores, each
# starting processes of two threads, spend the time handing threads over, several times the time of the work itself
os.environ['OMP_NUM_THREADS'] = str(TEST_THREADS)
torch.set_num_threads(TEST_THREADS)


@contextmanager
def one_torch_thread():
    "`TEST_THREADS` torch threads: on a busy 2-core machine, thread hand-offs cost small models and solves ~10x their time."
    n = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    try: yield
    finally: torch.set_num_threads(n)


@pytest.fixture(scope='module')
def one_thread():
    "`one_torch_thread` for a whole test module (`pytestmark = pytest.mark.usefixtures('one_thread')`)."
    with one_torch_thread(): yield


# The test files that take longest, longest first (`pytest --durations=70` on one worker, summed by file): `make test`
# runs files whole on two workers (`--dist loadfile --no-loadscope-reorder`) in the order collected, so these start
# first and the two workers end together rather than one waiting on the last long file. xdist's own order, by number
# of tests, ran the 60 s of test_device_kit.py's 4 tests last.
LONGEST_FIRST = ['test_readme.py', 'test_algorithms.py', 'test_train.py', 'test_distributed.py', 'test_bench.py',
                 'test_faults.py', 'test_device_kit.py', 'test_finetune.py', 'test_glyphs.py', 'test_run_folder.py',
                 'test_data_faults.py', 'test_learner.py', 'test_timm_suite.py']


def pytest_collection_modifyitems(items):
    "Collect the longest files first (a stable sort: each file's tests keep their order)."
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
