"Bad data met as a user meets it: a link loop in a class folder, truncated images, another library's download layout."
import csv
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision.datasets import CIFAR100 as TorchvisionCIFAR100

from fsmtl.classifier import FewShotClassifier
from fsmtl.cli import main
from fsmtl.data import benchmarks
from fsmtl.data.benchmarks import get_benchmark
from fsmtl.data.images import decode_image
from fsmtl.data.download import DataUnavailable, Resource
from fsmtl.data.images import class_images
from fsmtl.train import train
from test_benchmarks import SPLITS, _check_pixels, _mini_files, cifar  # noqa: F401  (cifar: a fixture)

pytestmark = pytest.mark.usefixtures('one_thread')


def fsmtl(*args):
    "Run the `fsmtl` command in a new process, as from a shell: its return code, stdout and stderr."
    r = subprocess.run([sys.executable, '-m', 'fsmtl.cli', *map(str, args)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    return r.returncode, r.stdout, r.stderr


def jpegs(folder, n, colour, seed=0, side=48):
    "`n` JPEGs of `colour` with noise, large enough that cutting one in half cuts into its image data."
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        im = (np.asarray(colour) + rng.normal(0, 25, (side, side, 3))).clip(0, 255).astype(np.uint8)
        Image.fromarray(im).save(folder / f'im{i}.jpg', quality=90)
    return sorted(folder.iterdir())


def truncate(path):
    "Keep the first half of the file at `path`, as an interrupted copy does."
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


# ---- row 7: a link loop in a class folder
def test_folder_link_loop(tmp_path, capsys):
    root = tmp_path / 'imgs'
    for c in range(5): jpegs(root / f'c{c:02d}', 2 + c, (40 * c, 90, 200 - 40 * c), seed=c)
    (root / 'c00' / 'loop').symlink_to('..')                                  # the loop of the report
    (root / 'c01' / 'again.jpg').symlink_to(root / 'c01' / 'im0.jpg')         # one file under two names
    # `fsmtl data`: each class holds its own files, once; c00's loop would add every class's images ~40 times
    assert main(['data', '--dataset', 'folder', '--root', str(root), '--no-download']) == 0
    out = capsys.readouterr().out
    counts = sorted(int(l.split()[3]) for l in out.splitlines() if l.strip().startswith(SPLITS))
    assert sum(counts) == 2 + 3 + 4 + 5 + 6
    # from Python: the same, path by path
    fs = get_benchmark('folder', root=root)
    for s in SPLITS:
        for k, name in enumerate(fs[s].classes):
            got = [p for p, y in zip(fs[s].items, fs[s].labels) if y == k]
            assert got == [root / name / f'im{i}.jpg' for i in range(2 + int(name[1:]))]
    # `fsmtl predict` lists its support folders the same way
    assert [len(f) for f in class_images([root / 'c00', root / 'c01'])] == [2, 3]
    # a link from one class to another class's image would leak it across classes (and splits): refused, both named
    (root / 'c02' / 'stolen.jpg').symlink_to(root / 'c04' / 'im0.jpg')
    with pytest.raises(ValueError, match='two classes') as e: get_benchmark('folder', root=root)
    assert str(root / 'c02' / 'stolen.jpg') in str(e.value) and str(root / 'c04' / 'im0.jpg') in str(e.value)


# ---- row 8: a truncated JPEG in a class folder
@pytest.mark.slow
def test_folder_truncated_jpeg(tmp_path):
    root = tmp_path / 'imgs'
    for c in range(5): jpegs(root / f'c{c}', 6, (50 * c, 100, 100), seed=c)
    bad = root / 'c3' / 'im4.jpg'
    truncate(bad)
    with Image.open(bad) as im: im.verify()   # the header check that let it through before
    with pytest.raises(ValueError, match='truncated'): decode_image(bad, 84)   # what a loader worker then met mid-epoch
    code, out, err = fsmtl('data', '--dataset', 'folder', '--root', root, '--no-download')
    assert code == 2 and out == ''
    assert str(bad) in err and 'truncated' in err and 'remove or replace' in err and '1 image(s)' in err
    # `train` stops on it before anything is trained or written
    runs = tmp_path / 'runs'
    with pytest.raises(ValueError, match='cannot be read') as e:
        train('folder', root=root, log_dir=runs, max_epochs=1, epoch_length=1, meta_batch_size=1, progress=False)
    assert str(bad) in str(e.value) and not (runs.exists() and any(runs.iterdir()))   # no run folder left behind
    # every bad image is named, not only the first
    truncate(root / 'c0' / 'im1.jpg')
    with pytest.raises(ValueError, match='2 image') as e: get_benchmark('folder', root=root)
    assert str(bad) in str(e.value) and str(root / 'c0' / 'im1.jpg') in str(e.value)


# ---- row 9: `fsmtl predict` with a corrupt query among good ones
COLOURS = {'red': (220, 30, 30), 'blue': (30, 40, 220)}


@pytest.fixture(scope='module')
def predict_files(tmp_path_factory):
    "A saved classifier, a support folder of two colour classes and ten query JPEGs named with their true colour."
    root = tmp_path_factory.mktemp('predict')
    torch.manual_seed(0)
    backbone = timm.create_model('resnet10t', num_classes=0, channels=(16, 32, 32, 64)).eval()
    FewShotClassifier(backbone, 32, (0.5,) * 3, (0.25,) * 3, arch='resnet10t',
                      arch_kwargs=dict(channels=(16, 32, 32, 64))).save(root / 'clf.pt')
    for k, (c, v) in enumerate(COLOURS.items()):
        jpegs(root / 'support' / c, 4, v, seed=k)
        for i, p in enumerate(jpegs(root / 'q' / c, 5, v, seed=10 + k)): p.rename(root / 'q' / f'{c}{i}.jpg')
    return root


@pytest.mark.slow
def test_predict_skips_corrupt_queries(predict_files, tmp_path):
    root = predict_files
    query = tmp_path / 'query'
    query.mkdir()
    for p in (root / 'q').glob('*.jpg'): (query / p.name).write_bytes(p.read_bytes())
    truncate(query / 'blue3.jpg')
    out_csv = tmp_path / 'pred.csv'
    code, out, err = fsmtl('predict', '--checkpoint', root / 'clf.pt', '--support', root / 'support', '--query', query,
                           '--out', out_csv)
    assert code == 0, err
    lines = [l.split('\t') for l in out.splitlines()]
    good = sorted(p.name for p in query.iterdir() if p.name != 'blue3.jpg')
    assert [l[0] for l in lines] == good and len(good) == 9
    assert all(f.startswith(label) for f, label, _ in lines)   # each query's colour, from its name
    assert 'blue3.jpg' in err and 'truncated' in err
    with open(out_csv, newline='') as f: assert list(csv.reader(f)) == [['file', 'label', 'probability'], *lines]
    # none readable: a failure, and no file of predictions
    for p in query.iterdir(): p.write_bytes(b'\xff\xd8\xff not a jpeg')
    assert main(['predict', '--checkpoint', str(root / 'clf.pt'), '--support', str(root / 'support'), '--query',
                 str(query), '--out', str(tmp_path / 'none.csv')]) == 2
    assert not (tmp_path / 'none.csv').exists()


def test_predict_names_every_corrupt_example(predict_files, tmp_path, capsys):
    root = predict_files
    support = tmp_path / 'support'
    for c in COLOURS: jpegs(support / c, 4, COLOURS[c], seed=3)
    bad = [support / 'red' / 'im1.jpg', support / 'blue' / 'im2.jpg']
    for p in bad: truncate(p)
    assert main(['predict', '--checkpoint', str(root / 'clf.pt'), '--support', str(support), '--query',
                 str(root / 'q')]) == 2
    err = capsys.readouterr().err
    assert all(str(p) in err for p in bad) and '2 image(s) cannot be read' in err and 'remove or replace' in err


# ---- row 14: CIFAR-100 as torchvision downloads it, mini-ImageNet as learn2learn does
@pytest.fixture
def tiny_cifar(cifar, monkeypatch):
    "The tiny CIFAR-100 archive of test_benchmarks, with the checksum fsmtl expects set to its own."
    monkeypatch.setattr(benchmarks, 'CIFAR100', Resource('cifar-100-python.tar.gz', ['https://example.invalid/c.tar.gz'],
                                                         hashlib.md5(cifar[0]).hexdigest()))
    return cifar


def test_cifar_in_torchvision_layout(tiny_cifar, tmp_path):
    archive, images = tiny_cifar
    # torchvision's CIFAR100(root, download=True) leaves root/<filename> and extracts it to root/<base_folder>
    tv_archive, tv_folder = tmp_path / TorchvisionCIFAR100.filename, tmp_path / TorchvisionCIFAR100.base_folder
    tv_archive.write_bytes(archive)
    fs = get_benchmark('cifarfs', root=tmp_path, download=False)
    for s in SPLITS: _check_pixels(fs[s], images)
    assert sorted(p.name for p in tv_folder.iterdir()) == ['meta', 'test', 'train']   # extracted beside the archive
    assert not (tmp_path / 'cifar100').exists()
    tv_archive.unlink()   # the extracted folder alone is enough
    fs = get_benchmark('fc100', root=tmp_path, download=False)
    for s in SPLITS: _check_pixels(fs[s], images)


def test_offline_message_lists_places(tmp_path, capsys):
    assert main(['data', '--dataset', 'cifarfs', '--root', str(tmp_path), '--no-download']) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'cifar100'} (fsmtl's)" in err and f"{tmp_path} (torchvision's" in err
    with pytest.raises(DataUnavailable) as e: get_benchmark('mini-imagenet', root=tmp_path, download=False)
    assert f"{tmp_path / 'mini-imagenet'} (fsmtl's)" in str(e.value) and f"{tmp_path} (learn2learn's" in str(e.value)


def test_mini_imagenet_in_learn2learn_layout(tmp_path):
    # learn2learn's MiniImagenet(root) keeps root/mini-imagenet-cache-{train,validation,test}.pkl
    files = _mini_files(tmp_path)
    fs = get_benchmark('mini-imagenet', root=tmp_path, download=False)
    for s in SPLITS:
        images, class_dict = files[s]
        w = fs[s].classes[0]
        assert sorted(im.tobytes() for im in fs[s].items[fs[s].labels == 0]) == sorted(images[i].tobytes()
                                                                                        for i in class_dict[w])
    assert fs.meta['source'] == str(tmp_path) and not (tmp_path / 'mini-imagenet').exists()


def grey16(path, grey8, seed=0):
    "Save the 8-bit grey array `grey8` to `path` as a 16-bit PNG, the low byte random; return the raw 16-bit values."
    raw = grey8.astype(np.uint16) * 256 + np.random.default_rng(seed).integers(0, 256, grey8.shape).astype(np.uint16)
    Image.fromarray(raw).save(path)
    assert Image.open(path).mode == 'I;16'
    return raw


def test_a_16_bit_png_decodes_to_its_shades(tmp_path):
    # it loaded as all 255 (PIL clips 16-bit grey when converting to RGB)
    from torchvision.io import decode_png
    from torchvision.transforms.v2.functional import to_dtype
    raw = grey16(tmp_path / 'g.png', np.arange(256, dtype=np.uint8).reshape(16, 16))
    got = decode_image(tmp_path / 'g.png', None)
    assert got.dtype == np.uint8 and got.shape == (16, 16, 3)
    np.testing.assert_array_equal(got, np.repeat((raw >> 8).astype(np.uint8)[..., None], 3, -1))   # numpy on the raw values
    ref = to_dtype(decode_png(torch.from_numpy(np.fromfile(tmp_path / 'g.png', np.uint8))), torch.uint8, scale=True)
    np.testing.assert_array_equal(got[..., 0], ref[0].numpy())   # torchvision's decoding
    assert decode_image(tmp_path / 'g.png', 8).std() > 30             # shades, not a blank image


def test_predict_reads_a_16_bit_png_as_its_8_bit_twin(predict_files, tmp_path):
    root, query = predict_files, tmp_path / 'query'
    query.mkdir()
    grey8 = np.asarray(Image.open(root / 'q' / 'blue0.jpg').convert('L'))
    Image.fromarray(grey8).save(query / 'a8.png')
    grey16(query / 'b16.png', grey8)
    code, out, err = fsmtl('predict', '--checkpoint', root / 'clf.pt', '--support', root / 'support', '--query', query)
    assert code == 0, err
    (n8, *p8), (n16, *p16) = [line.split('\t') for line in out.splitlines()]
    assert (n8, n16) == ('a8.png', 'b16.png') and p8 == p16
