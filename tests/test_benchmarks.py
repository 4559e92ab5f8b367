"Benchmarks from tiny files in the exact on-disk formats: CIFAR-100 archive, mini/tiered-ImageNet pickles, image folders."
import hashlib
import io
import pickle
import sys
import tarfile
import types

import numpy as np
import pytest
from PIL import Image

from fsmtl.data import benchmarks
from fsmtl.data.benchmarks import get_benchmark
from fsmtl.data.download import DataError, DataUnavailable, Resource
from fsmtl.data.splits import MINI_IMAGENET

SPLITS = ('train', 'val', 'test')

# CIFAR-100's meta file, written out by hand from the dataset's page
FINE = '''apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest
fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain
mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit
raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower
sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
worm'''.split()
COARSE = '''aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices household_furniture
insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes large_omnivores_and_herbivores
medium_mammals non-insect_invertebrates people reptiles small_mammals trees vehicles_1 vehicles_2'''.split()
FINE_TO_COARSE = [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11,
                  1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17, 10, 3,
                  2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1,
                  2, 15, 6, 0, 17, 8, 14, 13]
# CIFAR-FS novel classes (Bertinetto et al. 2019); its base classes are the other 64
CIFARFS_VAL = '''beaver beetle butterfly camel cattle crab crocodile flatfish lamp maple_tree motorcycle otter sea shark
television tractor'''.split()
CIFARFS_TEST = '''baby bed bicycle chimpanzee fox leopard man pickup_truck plain poppy rocket rose snail sweet_pepper table
telephone wardrobe whale woman worm'''.split()
# FC100 novel superclasses (Oreshkin et al. 2018); its base superclasses are the other 12
FC100_SUPER = {'val': ['large_carnivores', 'large_omnivores_and_herbivores', 'non-insect_invertebrates', 'small_mammals'],
               'test': ['aquatic_mammals', 'insects', 'medium_mammals', 'people']}
FC100_SUPER['train'] = [c for c in COARSE if c not in FC100_SUPER['val'] + FC100_SUPER['test']]


@pytest.fixture(scope='module')
def cifar():
    "A tiny cifar-100-python.tar.gz: 2 train + 1 test image per class, rows channel-planar, pickled with protocol 2."
    images = np.random.default_rng(0).integers(0, 256, (100, 3, 32, 32, 3), dtype=np.uint8)  # class, image, H, W, C

    def batch(js, label, seed):
        keys = np.random.default_rng(seed).permutation([(c, j) for c in range(100) for j in js])  # the real files are shuffled
        return {'data': np.stack([images[c, j].transpose(2, 0, 1).reshape(3072) for c, j in keys]),
                'fine_labels': [int(c) for c, _ in keys], 'coarse_labels': [FINE_TO_COARSE[c] for c, _ in keys],
                'filenames': [f'{FINE[c]}_s_{j:06d}.png' for c, j in keys], 'batch_label': label}
    files = {'train': batch([0, 1], 'training batch 1 of 1', 1), 'test': batch([2], 'testing batch 1 of 1', 2),
             'meta': {'fine_label_names': FINE, 'coarse_label_names': COARSE}, '../escape': {}}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz') as tf:
        for name, obj in files.items():
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f'cifar-100-python/{name}')
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue(), images


@pytest.fixture
def cifar_server(server, cifar, monkeypatch):
    server.files['cifar-100-python.tar.gz'] = cifar[0]
    monkeypatch.setattr(benchmarks, 'CIFAR100', Resource('cifar-100-python.tar.gz', [server.url('cifar-100-python.tar.gz')],
                                                         hashlib.md5(cifar[0]).hexdigest()))
    return server


def _check_pixels(split, images):
    for k, name in enumerate(split.classes):
        got, want = split.items[split.labels == k], images[FINE.index(name)]
        assert sorted(im.tobytes() for im in got[:2]) == sorted(im.tobytes() for im in want[:2])  # train, in file order
        assert np.array_equal(got[2], want[2])  # then test


def test_cifarfs(cifar_server, cifar, tmp_path):
    fs = get_benchmark('cifarfs', root=tmp_path)
    assert [fs[s].n_classes for s in SPLITS] == [64, 16, 20]
    assert fs.val.classes == CIFARFS_VAL and fs.test.classes == CIFARFS_TEST
    assert fs.train.classes == sorted(set(FINE) - set(CIFARFS_VAL) - set(CIFARFS_TEST))
    for s in SPLITS:
        assert fs[s].items.shape == (3 * fs[s].n_classes, 32, 32, 3) and fs[s].items.dtype == np.uint8
        assert (fs[s].counts() == 3).all()
        _check_pixels(fs[s], cifar[1])
    assert fs.mean == (0.5071, 0.4867, 0.4408) and fs.std == (0.2675, 0.2565, 0.2761) and fs.size == 32
    assert sorted(p.name for p in (tmp_path / 'cifar100' / 'cifar-100-python').iterdir()) == ['meta', 'test', 'train']
    assert sorted(p.name for p in (tmp_path / 'cifar100').iterdir()) == ['cifar-100-python', 'cifar-100-python.tar.gz']
    assert not list(tmp_path.rglob('escape'))


def test_fc100(cifar_server, cifar, tmp_path):
    fs = get_benchmark('FC100', root=tmp_path)
    assert [fs[s].n_classes for s in SPLITS] == [60, 20, 20]
    for s in SPLITS:
        supers = sorted(FC100_SUPER[s], key=COARSE.index)
        assert fs[s].classes == [FINE[f] for c in supers for f in range(100) if FINE_TO_COARSE[f] == COARSE.index(c)]
        assert (fs[s].counts() == 3).all()
        _check_pixels(fs[s], cifar[1])
    assert fs.meta['superclasses']['test'] == FC100_SUPER['test']


def test_cifar_extracts_once(cifar_server, tmp_path):
    get_benchmark('cifar-fs', root=tmp_path)
    (tmp_path / 'cifar100' / 'cifar-100-python.tar.gz').unlink()
    assert get_benchmark('fc100', root=tmp_path, download=False).test.n_classes == 20
    assert len(cifar_server.requests) == 1


def test_cifar_corrupt_archive(cifar_server, cifar, tmp_path, monkeypatch):
    archive = tmp_path / 'cifar100' / 'cifar-100-python.tar.gz'
    archive.parent.mkdir()
    archive.write_bytes(cifar[0][:len(cifar[0]) // 2])
    with pytest.raises(DataError) as e: get_benchmark('cifarfs', root=tmp_path)
    assert str(archive) in str(e.value) and benchmarks.CIFAR100.md5 in str(e.value)
    monkeypatch.setattr(benchmarks, 'CIFAR100', benchmarks.CIFAR100._replace(md5=None))
    with pytest.raises(DataError, match='not a complete CIFAR-100'): get_benchmark('cifarfs', root=tmp_path)
    assert not (tmp_path / 'cifar100' / 'cifar-100-python').exists()


def _mini_files(folder, rename=None, bytes_keys=False):
    "learn2learn's mini-ImageNet pickles, 3 images a class in shuffled rows; val gets an extra image of no class."
    folder.mkdir(parents=True, exist_ok=True)
    rng, out = np.random.default_rng(0), {}
    for s, mode in zip(SPLITS, ('train', 'validation', 'test')):
        wnids = [rename.get(w, w) for w in MINI_IMAGENET[s]] if rename else MINI_IMAGENET[s]
        images = rng.integers(0, 256, (3 * len(wnids) + (s == 'val'), 84, 84, 3), dtype=np.uint8)
        order = rng.permutation(len(images))
        class_dict = {w: order[3 * i:3 * i + 3].tolist() for i, w in enumerate(wnids)}
        obj = {'image_data': images, 'class_dict': class_dict}
        if bytes_keys: obj = {b'image_data': images, b'class_dict': {w.encode(): v for w, v in class_dict.items()}}
        (folder / f'mini-imagenet-cache-{mode}.pkl').write_bytes(pickle.dumps(obj, protocol=2 if s == 'train' else 4))
        out[s] = images, class_dict
    return out


@pytest.mark.parametrize('bytes_keys', [False, True])
def test_mini_imagenet(tmp_path, bytes_keys):
    files = _mini_files(tmp_path / 'mini-imagenet', bytes_keys=bytes_keys)
    fs = get_benchmark('mini_imagenet', root=tmp_path, download=False)
    assert [fs[s].n_classes for s in SPLITS] == [64, 16, 20]
    assert fs.train.classes[0] == 'n01532829' and fs.test.classes[-1] == 'n07613480'
    for s in SPLITS:
        images, class_dict = files[s]
        assert (fs[s].counts() == 3).all() and fs.size == 84
        for k, w in enumerate(fs[s].classes):
            got = sorted(im.tobytes() for im in fs[s].items[fs[s].labels == k])
            assert got == sorted(images[i].tobytes() for i in class_dict[w])
    assert fs.train.items is not None and len(fs.train) == 3 * 64 and len(fs.val) == 3 * 16


def test_mini_imagenet_wrong_classes(tmp_path):
    _mini_files(tmp_path / 'mini-imagenet', rename={'n01532829': 'n00000000'})
    with pytest.raises(DataError) as e: get_benchmark('miniimagenet', root=tmp_path, download=False)
    msg = str(e.value)
    assert 'n00000000' in msg and 'n01532829' in msg and 'mini-imagenet-cache-train.pkl' in msg and 'zenodo.org' in msg


def test_mini_imagenet_web_page_on_disk(tmp_path):
    _mini_files(tmp_path / 'mini-imagenet')
    bad = tmp_path / 'mini-imagenet' / 'mini-imagenet-cache-test.pkl'
    bad.write_bytes(b'<!DOCTYPE html><html>Sign in to Dropbox</html>')
    with pytest.raises(DataError) as e: get_benchmark('mini-imagenet', root=tmp_path, download=False)
    assert str(bad) in str(e.value) and 'https://zenodo.org/record/7978538/files/mini-imagenet-cache-test.pkl' in str(e.value)


def _png(im):
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format='PNG')
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)  # what cv2.imencode gives: a 1-D uint8 array


def _tiered_files(folder, counts=(351, 97, 160)):
    "tiered-ImageNet's png and label pickles: one image a class, two for class 0, as small blocky 84x84 images."
    folder.mkdir(parents=True, exist_ok=True)
    rng, out = np.random.default_rng(0), {}
    for s, n in zip(SPLITS, counts):
        labels = np.r_[0, np.arange(n)].astype(np.int32)
        images = np.kron(rng.integers(0, 256, (len(labels), 12, 12, 3), dtype=np.uint8), np.ones((1, 7, 7, 1), np.uint8))
        names = [f'{s} class {i}'.encode() if i % 2 else f'{s} class {i}' for i in range(n)]  # py2 pickles may give bytes
        meta = {'label_specific': labels, 'label_general': labels // 20, 'label_specific_str': names,
                'label_general_str': {i: f'category {i}' for i in range(n // 20 + 1)}}
        (folder / f'{s}_labels.pkl').write_bytes(pickle.dumps(meta, protocol=2))
        (folder / f'{s}_images_png.pkl').write_bytes(pickle.dumps([_png(im) for im in images], protocol=4))
        out[s] = images, labels
    return out


def test_tiered_imagenet(tmp_path):
    files = _tiered_files(tmp_path / 'tiered-imagenet')
    fs = get_benchmark('tiered_imagenet', root=tmp_path, download=False)
    assert [fs[s].n_classes for s in SPLITS] == [351, 97, 160]
    assert fs.val.classes[:2] == ['val class 0', 'val class 1']
    for s in SPLITS:
        images, labels = files[s]
        assert np.array_equal(fs[s].labels, labels) and not fs[s].in_memory
        idx = [0, 1, len(labels) - 1]
        assert np.array_equal(fs[s].load(idx), images[idx])
    assert fs.size == 84 and abs(fs.mean[0] - 120.39586422 / 255) < 1e-9


def test_tiered_imagenet_wrong_class_count(tmp_path):
    _tiered_files(tmp_path / 'tiered-imagenet', counts=(351, 96, 160))
    with pytest.raises(DataError) as e: get_benchmark('tiered-imagenet', root=tmp_path, download=False)
    assert 'val_labels.pkl' in str(e.value) and '97' in str(e.value) and 'zenodo.org' in str(e.value)


@pytest.mark.parametrize('name, file', [
    ('mini-imagenet', 'mini-imagenet-cache-validation.pkl'), ('MiniImageNet', 'mini-imagenet-cache-test.pkl'),
    ('CIFAR-FS', 'cifar-100-python.tar.gz'), ('cifar_fs', 'cifar-100-python.tar.gz'), ('fc-100', 'cifar-100-python.tar.gz'),
    ('Tiered_ImageNet', 'val_images_png.pkl')])
def test_aliases_and_missing_files(tmp_path, name, file):
    with pytest.raises(DataUnavailable) as e: get_benchmark(name, root=tmp_path, download=False)
    assert file in str(e.value) and 'https://' in str(e.value) and str(tmp_path) in str(e.value)


def test_unknown_benchmark():
    with pytest.raises(ValueError) as e: get_benchmark('omniglot')
    assert all(n in str(e.value) for n in ['mini-imagenet', 'tiered-imagenet', 'cifarfs', 'fc100', 'glyphs', 'folder'])


def test_glyphs_dispatch(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(glyphs=lambda root, **kw: calls.append((root, kw)) or 'splits')
    monkeypatch.setitem(sys.modules, 'fsmtl.data.glyphs', fake)
    assert get_benchmark('Glyphs', root=tmp_path, seed=3) == 'splits'
    assert calls == [(tmp_path, {'seed': 3})]


def _images(folder, n, colour, ext='png'):
    folder.mkdir(parents=True)
    for i in range(n): Image.new('RGB', (8 + i, 6), colour).save(folder / f'im{i}.{ext}')


def _class_folders(root, n=10):
    for c in range(n): _images(root / f'c{c}', 2, (c * 20, 0, 0), 'jpg' if c % 2 else 'png')


def test_folder_ratios(tmp_path):
    _class_folders(tmp_path / 'imgs')
    fs = get_benchmark('folder', root=tmp_path / 'imgs')
    classes = [fs[s].classes for s in SPLITS]
    assert [len(c) for c in classes] == [6, 2, 2] and sorted(sum(classes, [])) == [f'c{c}' for c in range(10)]
    assert classes == [get_benchmark('folder', root=tmp_path / 'imgs')[s].classes for s in SPLITS]
    assert classes != [get_benchmark('folder', root=tmp_path / 'imgs', seed=1)[s].classes for s in SPLITS]
    for s in SPLITS:
        assert fs[s].classes == sorted(fs[s].classes) and (fs[s].counts() == 2).all()
        assert fs[s].items == sorted(fs[s].items)
        ims = fs[s].load(range(len(fs[s])))
        assert ims.shape == (len(fs[s]), 84, 84, 3)
        reds = [int(fs[s].classes[k][1:]) * 20 for k in fs[s].labels]
        assert np.abs(ims[:, 40, 40, 0].astype(int) - reds).max() <= 3  # JPEG may shift a flat colour slightly
    assert fs.mean == (0.485, 0.456, 0.406)


def test_folder_presplit(tmp_path):
    for s, cs in [('train', 'ab'), ('val', 'c'), ('test', 'de')]:
        for c in cs: _images(tmp_path / s / c, 2, (0, 0, 255))
    fs = get_benchmark('folder', root=tmp_path, size=None)
    assert [fs[s].classes for s in SPLITS] == [['a', 'b'], ['c'], ['d', 'e']]
    assert fs.test.items[0] == tmp_path / 'test' / 'd' / 'im0.png'
    with pytest.raises(ValueError, match='sizes'): fs.train.load([0, 1])


@pytest.mark.parametrize('setup, kwargs, message', [
    (lambda r: None, {}, 'No folder'),
    (lambda r: _class_folders(r, 2), {}, 'at least 3'),
    (lambda r: _class_folders(r, 3), {'ratios': (0.8, 0.1, 0.1)}, 'no class for val, test'),
    (lambda r: (_class_folders(r, 4), (r / 'c4').mkdir()), {}, 'c4'),
    (lambda r: (_images(r / 'train' / 'a', 1, 'red'), _images(r / 'test' / 'b', 1, 'red')), {}, 'no val folder'),
    (lambda r: (_class_folders(r, 4), (r / 'c2' / 'im1.jpg').write_bytes(b'\xff\xd8 not really a jpeg')), {}, 'im1.jpg'),
])
def test_folder_errors(tmp_path, setup, kwargs, message):
    root = tmp_path / 'imgs'
    setup(root)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as e: get_benchmark('folder', root=root, **kwargs)
    if message == 'im1.jpg': assert str(root / 'c2' / 'im1.jpg') in str(e.value) and '1 image(s)' in str(e.value)
