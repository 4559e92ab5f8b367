"Tiny torchvision datasets on disk, in the layout each torchvision class reads (as torchvision's own tests fake them)."
import csv
import struct
from pathlib import Path

import numpy as np
from PIL import Image


def _image(rng, size, path=None, mode='RGB'):
    "A random image of side `size` (a pair: width, height), saved to `path` when given."
    w, h = (size, size) if isinstance(size, int) else size
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        im.save(path)
    return im


def _sizes(rng, n): return [tuple(int(v) for v in rng.integers(14, 30, 2)) for _ in range(n)]


def eurosat(root, n_classes=7, per_class=6, rng=None):
    "eurosat/2750/<class>/<class>_<i>.jpg, images of mixed sizes."
    rng = rng or np.random.default_rng(0)
    for c in range(n_classes):
        for i, s in enumerate(_sizes(rng, per_class)): _image(rng, s, root / 'eurosat' / '2750' / f'Land{c}' / f'Land{c}_{i}.jpg')


def _idx(path, arr):
    "An idx file (big-endian header of type and dims, then the bytes), as MNIST's raw files."
    arr = np.asarray(arr, dtype=np.uint8)
    with open(path, 'wb') as f:
        f.write(struct.pack('>BBBB', 0, 0, 0x08, arr.ndim) + struct.pack(f'>{arr.ndim}I', *arr.shape))
        f.write(arr.tobytes())


def mnist(root, folder='MNIST', per_class=(4, 3), rng=None):
    "<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte: 10 classes, uncompressed."
    rng = rng or np.random.default_rng(0)
    raw = root / folder / 'raw'
    raw.mkdir(parents=True)
    for prefix, n in zip(('train', 't10k'), per_class):
        labels = rng.permutation(np.repeat(np.arange(10), n))
        _idx(raw / f'{prefix}-images-idx3-ubyte', rng.integers(0, 256, (len(labels), 28, 28)))
        _idx(raw / f'{prefix}-labels-idx1-ubyte', labels)


def omniglot(root, alphabets=dict(background=(3, 3), evaluation=(2, 3)), per_class=5, rng=None):
    "omniglot-py/images_<part>/<alphabet>/character<k>/<id>_<k>.png: `alphabets[part]` = (alphabets, characters each)."
    rng = rng or np.random.default_rng(0)
    for part, (n_alpha, n_char) in alphabets.items():
        for a in range(n_alpha):
            for k in range(n_char):
                for i in range(per_class):
                    _image(rng, 20, root / 'omniglot-py' / f'images_{part}' / f'{part[:4]}Alpha{a}' / f'character{k + 1:02d}'
                           / f'{a:02d}{k:02d}_{i:02d}.png', mode='L')


def flowers102(root, n_classes=8, per_class=5, rng=None):
    "flowers-102/jpg/image_<id>.jpg, imagelabels.mat and setid.mat (scipy)."
    from scipy.io import savemat
    rng = rng or np.random.default_rng(0)
    base = root / 'flowers-102'
    labels = rng.permutation(np.repeat(np.arange(1, n_classes + 1), per_class))
    for i, s in enumerate(_sizes(rng, len(labels)), 1): _image(rng, s, base / 'jpg' / f'image_{i:05d}.jpg')
    savemat(base / 'imagelabels.mat', {'labels': labels})
    ids = rng.permutation(np.arange(1, len(labels) + 1))
    savemat(base / 'setid.mat', {'trnid': ids[:10], 'valid': ids[10:20], 'tstid': ids[20:]})


def dtd(root, n_classes=6, per_split=(2, 2, 2), rng=None):
    "dtd/dtd/images/<class>/<class>_<i>.jpg and labels/{train,val,test}1.txt."
    rng = rng or np.random.default_rng(0)
    base = root / 'dtd' / 'dtd'
    (base / 'labels').mkdir(parents=True)
    lines = {s: [] for s in ('train', 'val', 'test')}
    for c in range(n_classes):
        i = 0
        for s, n in zip(lines, per_split):
            for _ in range(n):
                _image(rng, _sizes(rng, 1)[0], base / 'images' / f'tex{c}' / f'tex{c}_{i:04d}.jpg')
                lines[s].append(f'tex{c}/tex{c}_{i:04d}.jpg')
                i += 1
    for s, ls in lines.items(): (base / 'labels' / f'{s}1.txt').write_text('\n'.join(ls) + '\n')


def gtsrb(root, n_classes=6, per_split=(3, 2), rng=None):
    "gtsrb/GTSRB/Training/<class>/*.ppm, gtsrb/GTSRB/Final_Test/Images/*.ppm and gtsrb/GT-final_test.csv."
    rng = rng or np.random.default_rng(0)
    base = root / 'gtsrb'
    rows = []
    for c in range(n_classes):
        for i in range(per_split[0]): _image(rng, _sizes(rng, 1)[0], base / 'GTSRB' / 'Training' / f'{c:05d}' / f'00000_{i:05d}.ppm')
        for i in range(per_split[1]):
            name = f'{c:03d}{i:02d}.ppm'
            _image(rng, _sizes(rng, 1)[0], base / 'GTSRB' / 'Final_Test' / 'Images' / name)
            rows.append(dict(Filename=name, Width=0, Height=0, **{'Roi.X1': 0, 'Roi.Y1': 0, 'Roi.X2': 0, 'Roi.Y2': 0}, ClassId=c))
    with open(base / 'GT-final_test.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=';')
        w.writeheader()
        w.writerows(rows)


def fgvc_aircraft(root, n_classes=6, per_split=(3, 2), rng=None):
    "fgvc-aircraft-2013b/data/images/<id>.jpg, variants.txt and images_variant_{trainval,test}.txt."
    rng = rng or np.random.default_rng(0)
    data = root / 'fgvc-aircraft-2013b' / 'data'
    names = [f'Jet {c}/{c + 1}' for c in range(n_classes)]   # variant names hold spaces and slashes
    (data / 'images').mkdir(parents=True)
    (data / 'variants.txt').write_text('\n'.join(names) + '\n')
    k = 0
    for split, n in zip(('trainval', 'test'), per_split):
        lines = []
        for name in names:
            for _ in range(n):
                _image(rng, _sizes(rng, 1)[0], data / 'images' / f'{k:07d}.jpg')
                lines.append(f'{k:07d} {name}')
                k += 1
        (data / f'images_variant_{split}.txt').write_text('\n'.join(lines) + '\n')


def oxford_iiit_pet(root, n_classes=6, per_split=(3, 2), rng=None):
    "oxford-iiit-pet/images/<Breed>_<i>.jpg and annotations/{trainval,test}.txt."
    rng = rng or np.random.default_rng(0)
    base = root / 'oxford-iiit-pet'
    (base / 'annotations').mkdir(parents=True)
    i = 0
    for split, n in zip(('trainval', 'test'), per_split):
        lines = []
        for c in range(n_classes):
            for _ in range(n):
                image_id = f'breed_{chr(97 + c)}_{i}'
                _image(rng, _sizes(rng, 1)[0], base / 'images' / f'{image_id}.jpg')
                lines.append(f'{image_id} {c + 1} {c % 2 + 1} 1')
                i += 1
        (base / 'annotations' / f'{split}.txt').write_text('\n'.join(lines) + '\n')


# name -> (writer, the torchvision modules whose md5 check of the files it cannot reproduce is patched, as torchvision's tests do)
FAKES = {'EuroSAT': (eurosat, ()), 'MNIST': (mnist, ()),
         'FashionMNIST': (lambda root: mnist(root, 'FashionMNIST'), ()), 'KMNIST': (lambda root: mnist(root, 'KMNIST'), ()),
         'Omniglot': (omniglot, ('omniglot',)), 'Flowers102': (flowers102, ('flowers102',)), 'DTD': (dtd, ()),
         'GTSRB': (gtsrb, ()), 'FGVCAircraft': (fgvc_aircraft, ()), 'OxfordIIITPet': (oxford_iiit_pet, ())}
