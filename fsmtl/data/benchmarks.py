"`get_benchmark`: the few-shot benchmarks by name, fetched, checked and split."
from __future__ import annotations
import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
from fastai.vision.core import imagenet_stats

from ..models.resnet12 import MINI_IMAGENET_MEAN, MINI_IMAGENET_STD
from .core import SPLITS, FewShotSplits, Split
from .download import DataError, DataUnavailable, Resource, fetch, safe_load_pickle
from .images import check_images, class_dirs, class_images
from .splits import CIFARFS, FC100, MINI_IMAGENET, TIERED_IMAGENET_CLASSES

__all__ = ['get_benchmark', 'folder_benchmark', 'same_classes', 'BENCHMARKS', 'CIFAR100', 'MINI_IMAGENET_FILES', 'TIERED_IMAGENET_FILES']

CIFAR100 = Resource('cifar-100-python.tar.gz', ['https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz'],
                    'eb9058c3a382ffc7106e4002c42a8d85')
_ZENODO = 'https://zenodo.org/record/7978538/files/'
_MINI_DROPBOX = {'train': '9g8c6w345s2ek03', 'validation': 'ip1b7se3gij3r1b', 'test': 'ye9jeb5tyz0x01b'}
# learn2learn's pickles have no published checksum, so they are only ever read through `safe_load_pickle`
MINI_IMAGENET_FILES = {s: Resource(f'mini-imagenet-cache-{m}.pkl', [f'{_ZENODO}mini-imagenet-cache-{m}.pkl',
                                   f'https://www.dropbox.com/s/{_MINI_DROPBOX[m]}/mini-imagenet-cache-{m}.pkl?dl=1'])
                       for s, m in zip(SPLITS, ('train', 'validation', 'test'))}
TIERED_IMAGENET_FILES = {s: [Resource(f'{s}_{kind}.pkl', [f'{_ZENODO}tiered-imagenet-{s}_{kind}.pkl'])
                             for kind in ('images_png', 'labels')] for s in SPLITS}

# Lee et al. 2019 (MetaOptNet), as the original code normalised each benchmark
_CIFAR_STATS = dict(mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761))
_MINI_STATS = dict(mean=MINI_IMAGENET_MEAN, std=MINI_IMAGENET_STD)
_CIFAR_MEMBERS = ('train', 'test', 'meta')


def _redownload(path, url):
    return f"Delete {path} and run again to download it afresh from {url}, or put a good copy there by hand."


def _load(path, fix):
    "Unpickle `path` safely; a failure is a `DataError` whose `fix` says how to replace it."
    try: return safe_load_pickle(path)
    except MemoryError: raise
    except Exception as e: raise DataError(f"Cannot read {path}: {e}. {fix}") from e


def _text(s): return s.decode('latin1') if isinstance(s, bytes) else str(s)


def _fields(obj, keys, path, fix):
    "The values of `keys` in the unpickled dict `obj`."
    # its keys may be bytes, when Python 2 pickled it
    if isinstance(obj, dict):
        obj = {_text(k): v for k, v in obj.items()}
        missing = [k for k in keys if k not in obj]
        if not missing: return [obj[k] for k in keys]
    else: missing = keys
    raise DataError(f"{path} is not the expected data file: it has no {', '.join(missing)}. {fix}")


def _place(folders, names):
    "The one of `folders` holding the most of the files `names`."
    # the first on a tie: where they are read or downloaded
    return max(folders, key=lambda d: sum((d / n).exists() for n in names))


def _fetch(resources, places, download):
    "Paths of `resources`, all from the one of `places` that holds the most."
    # `places`: folder -> whose layout it is
    folder = _place(list(places), [r.name for r in resources])
    try: return fetch(resources, folder, download)
    except DataUnavailable as e:
        where = ', '.join(f"{d} ({who})" for d, who in places.items())
        raise DataUnavailable(f"{e}\nFiles already downloaded are used as they are, when all of them are in one of: "
                              f"{where}.") from None


def _extract_cifar(archive, dest):
    "Extract the three pickles of the CIFAR-100 `archive` into `dest`."
    # through a temporary folder, so never half-extracted
    fix = _redownload(archive, CIFAR100.urls[0])
    tmp = Path(tempfile.mkdtemp(prefix='.extract-', dir=archive.parent))
    try:
        with tarfile.open(archive, 'r:gz') as tf:
            members = [tf.getmember(f'cifar-100-python/{m}') for m in _CIFAR_MEMBERS]
            tf.extractall(tmp, members=members, filter='data')
        dest.mkdir(exist_ok=True)
        for m in _CIFAR_MEMBERS: os.replace(tmp / 'cifar-100-python' / m, dest / m)
    except (tarfile.TarError, KeyError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{archive} is not a complete CIFAR-100 python archive ({e!r}). {fix}") from e
    finally: shutil.rmtree(tmp, ignore_errors=True)


def _cifar100(root, download):
    "CIFAR-100's train and test images pooled (600 per class), fine labels and names."
    places = {root / 'cifar100': "fsmtl's", root: "torchvision's CIFAR100(root): the archive or its cifar-100-python folder"}
    # the archive, or the folder it extracts to, from either place; an archive is extracted beside itself
    found = [d / 'cifar-100-python' for d in places if all((d / 'cifar-100-python' / m).exists() for m in _CIFAR_MEMBERS)]
    if found: extracted = found[0]
    else:
        archive = _fetch([CIFAR100], places, download)[0]
        extracted = archive.parent / 'cifar-100-python'
        _extract_cifar(archive, extracted)
    fix = f"Delete the folder {extracted} and run again to extract it afresh from {CIFAR100.name}."
    data, labels = [], []
    for m in ('train', 'test'):
        path = extracted / m
        x, y = _fields(_load(path, fix), ['data', 'fine_labels'], path, fix)
        y = np.asarray(y, dtype=np.int64)
        if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.shape == (len(y), 3072)):
            raise DataError(f"{path} does not hold uint8 rows of 3072 values, one per label. {fix}")
        data.append(x)
        labels.append(y)
    (names,) = _fields(_load(extracted / 'meta', fix), ['fine_label_names'], extracted / 'meta', fix)
    # rows are channel-planar (1024 red, 1024 green, 1024 blue); torchvision turns them to HWC the same way
    images = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.concatenate(labels), [_text(n) for n in names]   # images: uint8 (N, 32, 32, 3)


def _select(images, labels, names, classes):
    "The `Split` of `classes` (names, in this order) out of the pooled CIFAR-100 `images`."
    ids = {n: i for i, n in enumerate(names)}
    if missing := [c for c in classes if c not in ids]:
        raise DataError(f"CIFAR-100's meta file lacks the classes {missing}: the archive is not the official one.")
    idxs = [np.flatnonzero(labels == ids[c]) for c in classes]
    return Split(images[np.concatenate(idxs)], np.repeat(np.arange(len(classes)), [len(i) for i in idxs]), classes)


def _cifarfs(root, download):
    "CIFAR-FS (Bertinetto et al. 2019): 64/16/20 CIFAR-100 classes, 32x32."
    pooled = _cifar100(root, download)
    return FewShotSplits('cifarfs', *(_select(*pooled, CIFARFS[s]) for s in SPLITS), **_CIFAR_STATS,
                         meta={'source': CIFAR100.urls[0]})


def _fc100(root, download):
    "FC100 (Oreshkin et al. 2018): 12/4/4 CIFAR-100 superclasses (60/20/20 classes), 32x32."
    pooled = _cifar100(root, download)
    splits = [_select(*pooled, [c for fine in FC100[s].values() for c in fine]) for s in SPLITS]
    return FewShotSplits('fc100', *splits, **_CIFAR_STATS,
                         meta={'source': CIFAR100.urls[0], 'superclasses': {s: list(FC100[s]) for s in SPLITS}})


def _few(names): return ', '.join(sorted(names)[:5]) + (' ...' if len(names) > 5 else '') or 'none'


def _mini_split(path, res, wnids):
    "One split from learn2learn's mini-ImageNet pickle `path`, classes ordered as `wnids`."
    fix = _redownload(path, res.urls[0])
    data, class_dict = _fields(_load(path, fix), ['image_data', 'class_dict'], path, fix)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 4 and data.shape[-1] == 3
            and isinstance(class_dict, dict)):
        raise DataError(f"{path} does not hold uint8 images (N, H, W, 3) and a dict of classes. {fix}")
    class_dict = {_text(k): v for k, v in class_dict.items()}
    if set(class_dict) != set(wnids):
        missing, extra = _few(set(wnids) - set(class_dict)), _few(set(class_dict) - set(wnids))
        raise DataError(f"{path} does not hold the classes of Ravi & Larochelle's split: missing {missing}, "
                        f"unexpected {extra}. {fix}")
    idxs = [np.asarray(class_dict[w], dtype=np.int64).reshape(-1) for w in wnids]
    labels = np.repeat(np.arange(len(wnids)), [len(i) for i in idxs])
    idx = np.concatenate(idxs)
    if np.array_equal(np.sort(idx), np.arange(len(data))):
        # each image belongs to one class: label in place rather than copy hundreds of MB
        in_place = np.empty_like(labels)
        in_place[idx] = labels
        return Split(data, in_place, wnids)
    if len(idx) and (idx.min() < 0 or idx.max() >= len(data)):
        raise DataError(f"{path} has class indices outside its {len(data)} images. {fix}")
    return Split(data[idx], labels, wnids)


def _mini_imagenet(root, download):
    "mini-ImageNet (Ravi & Larochelle 2017): 64/16/20 classes, 600 84x84 images per class."
    # ImageNet classes, from learn2learn's pickles
    places = {root / 'mini-imagenet': "fsmtl's", root: "learn2learn's MiniImagenet(root)"}
    paths = _fetch([MINI_IMAGENET_FILES[s] for s in SPLITS], places, download)
    splits = [_mini_split(p, MINI_IMAGENET_FILES[s], MINI_IMAGENET[s]) for p, s in zip(paths, SPLITS)]
    return FewShotSplits('mini-imagenet', *splits, **_MINI_STATS, meta={'source': str(paths[0].parent)})


def _tiered_labels(path, split, url):
    "Labels and class names of one tiered-ImageNet split, checked."
    # against the published class count, and for labels that are class indices
    fix = _redownload(path, url)
    labels, names = _fields(_load(path, fix), ['label_specific', 'label_specific_str'], path, fix)
    labels, names, n = np.asarray(labels, dtype=np.int64), [_text(c) for c in names], TIERED_IMAGENET_CLASSES[split]
    if len(names) != n:
        raise DataError(f"{path} names {len(names)} classes, but tiered-ImageNet's {split} split has {n}. {fix}")
    if labels.ndim != 1 or (len(labels) and (labels.min() < 0 or labels.max() >= n)):
        raise DataError(f"{path} holds labels that are not class indices 0..{n - 1}. {fix}")
    return labels, names


def _tiered_imagenet(root, download):
    "tiered-ImageNet (Ren et al. 2018): 351/97/160 classes in 34 categories, 84x84."
    # ImageNet classes, as PNGs decoded when loaded
    places = {root / 'tiered-imagenet': "fsmtl's and learn2learn's TieredImagenet(root)"}
    paths = _fetch([r for s in SPLITS for r in TIERED_IMAGENET_FILES[s]], places, download)
    images_paths, labels_paths = paths[0::2], paths[1::2]
    # all the small label files are checked before the first of the large image files is read
    labels = [_tiered_labels(p, s, TIERED_IMAGENET_FILES[s][1].urls[0]) for p, s in zip(labels_paths, SPLITS)]
    splits = []
    for path, s, (y, names) in zip(images_paths, SPLITS, labels):
        fix = _redownload(path, TIERED_IMAGENET_FILES[s][0].urls[0])
        images = _load(path, fix)
        if not (isinstance(images, list) and len(images) == len(y)):
            raise DataError(f"{path} should hold a list of {len(y)} PNG-encoded images, one per label. {fix}")
        splits.append(Split(images, y, names))
    return FewShotSplits('tiered-imagenet', *splits, **_MINI_STATS, meta={'source': str(paths[0].parent)})


def _split_classes(dirs, ratios, seed):
    "The class folders `dirs` drawn into train/val/test by `ratios`, reproducibly for `seed`."
    if len(ratios) != 3 or min(ratios) < 0 or sum(ratios) <= 0:
        raise ValueError(f"ratios must be three non-negative numbers for train, val and test, not {ratios}")
    n, r = len(dirs), np.asarray(ratios, dtype=float) / sum(ratios)
    counts = [n - round(n * r[1]) - round(n * r[2]), round(n * r[1]), round(n * r[2])]
    if empty := [s for s, c in zip(SPLITS, counts) if c < 1]:
        raise ValueError(f"{n} classes split by ratios {tuple(ratios)} leave no class for {', '.join(empty)}: "
                         "add class folders or change `ratios`")
    parts = np.split(np.random.default_rng(seed).permutation(n), np.cumsum(counts)[:-1])
    return [sorted(dirs[i] for i in part) for part in parts]


def folder_benchmark(
    path,                     # a folder of class folders (a class: the images under it, links to folders not followed)
    ratios=(0.6, 0.2, 0.2),   # shares of the classes for train, val and test when `path` holds the class folders
    seed=0,                   # seed of the draw of classes into splits
    size=84,                  # side the images are resized to when loaded; None keeps their own size
) -> FewShotSplits:
    "Few-shot splits from folders of images, one folder per class."
    # `path/<class>/<image>`, or `path/{train,val,test}/<class>/<image>` with the splits given
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"No folder {path}: give a folder with one folder of images per class, "
                                "or with train/, val/ and test/ folders that each hold class folders")
    dirs = class_dirs(path)
    named = {('val' if d.name == 'valid' else d.name): d for d in dirs if d.name in ('train', 'val', 'valid', 'test')}
    if named:
        if missing := [s for s in SPLITS if s not in named]:
            raise ValueError(f"{path} has {', '.join(sorted(named))} but no {', '.join(missing)} folder: give all of "
                             "train/, val/ and test/, or put the class folders directly in it")
        per_split = [class_dirs(named[s]) for s in SPLITS]
        if empty := [s for s, ds in zip(SPLITS, per_split) if not ds]:
            raise ValueError(f"{path}: the {', '.join(empty)} folder(s) hold no class folders")
    else:
        if len(dirs) < 3:
            raise ValueError(f"{path} has {len(dirs)} class folder(s); few-shot splits need at least 3 (one per split)")
        per_split = _split_classes(dirs, ratios, seed)
    per_class = iter(class_images(sum(per_split, [])))   # all splits at once: no image may be in two classes
    files = [[next(per_class) for _ in ds] for ds in per_split]
    # decoded now, as training decodes them, so that a bad file stops the run here and not in a loader worker
    check_images([f for fs in files for class_files in fs for f in class_files], size)
    splits = [Split(sum(fs, []), np.repeat(np.arange(len(fs)), [len(f) for f in fs]), [d.name for d in ds], size=size)
              for ds, fs in zip(per_split, files)]
    return FewShotSplits(path.name, *splits, mean=tuple(imagenet_stats[0]), std=tuple(imagenet_stats[1]),
                         meta={'source': str(path)})


def _glyphs(root, download, **kwargs):
    from .glyphs import glyphs  # imported here: rendering needs matplotlib's fonts, the other benchmarks do not
    return glyphs(root, **kwargs)


def _glyphs_small(root, download, **kwargs):
    from .glyphs import SMALL_IMAGES, glyphs
    return glyphs(root, **{'n_images': SMALL_IMAGES, **kwargs})


BENCHMARKS = {'mini-imagenet': _mini_imagenet, 'tiered-imagenet': _tiered_imagenet, 'cifarfs': _cifarfs,
              'fc100': _fc100, 'glyphs': _glyphs, 'glyphs-small': _glyphs_small,
              'folder': lambda root, download, **kw: folder_benchmark(root, **kw)}


def _key(name): return ''.join(c for c in str(name).lower() if c.isalnum())


# benchmarks that hold another's classes: a backbone trained on either has seen both's base classes
SAME_CLASSES = {'glyphs-small': 'glyphs'}


def same_classes(a,                # a benchmark name, in any case, with or without '-' or '_'
                 b                 # another benchmark name
                 ) -> bool:        # whether they hold the same classes
    "Whether benchmarks `a` and `b` hold the same classes ('glyphs' and 'glyphs-small' do)."
    key = lambda n: {_key(k): _key(v) for k, v in SAME_CLASSES.items()}.get(_key(n), _key(n))
    return a is not None and b is not None and key(a) == key(b)


def get_benchmark(
    name,            # one of `BENCHMARKS` in any case, with or without '-' or '_' ('miniImageNet', 'cifar_fs', 'FC100'),
                     # 'torchvision:NAME' (a torchvision classification dataset), or 'folder:PATH'
    root='~/data',   # folder of the data folders; for 'folder', the user's folder of images itself
    download=True,   # download missing files; False raises an error that names them and where to put them
    **kwargs,        # passed to the benchmark: `ratios`, `seed`, `size` for folders and torchvision (and its `split`),
                     # the options of `glyphs`
) -> FewShotSplits:  # the train, val and test splits
    "The splits of benchmark `name`, downloaded if missing."
    kind, sep, rest = str(name).partition(':')
    if sep and kind.lower() == 'torchvision':
        from .torchvision_domains import torchvision_benchmark
        return torchvision_benchmark(rest, Path(root).expanduser(), download, **kwargs)
    if sep and kind.lower() == 'folder': return folder_benchmark(rest, **kwargs)
    builder = {_key(k): v for k, v in BENCHMARKS.items()}.get(_key(name))
    if builder is None: raise ValueError(f"Unknown benchmark {name!r}: use one of {', '.join(BENCHMARKS)}, "
                                       "torchvision:NAME or folder:PATH")
    return builder(Path(root).expanduser(), download, **kwargs)
