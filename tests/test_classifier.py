import csv
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from fsmtl.classifier import FewShotClassifier, image_batch
from fsmtl.data.core import InputSpec
from fsmtl.data.images import image_files
from fsmtl.cli import main
from fsmtl.train import evaluate_checkpoint

SIZE, MEAN, STD = 32, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
ARCH, KW = 'resnet10t', dict(channels=(32, 64, 96, 128))
COLOURS = {'red': (210, 40, 40), 'green': (40, 190, 60), 'blue': (50, 70, 220), 'yellow': (220, 200, 40)}
SHOTS, QUERIES = 5, 10


def picture(colour, rng, shape=(SIZE, SIZE)):
    "A uint8 image of `colour` with noise and a darker or lighter rectangle at a random place."
    im = np.asarray(colour, np.float64) + rng.normal(0, 20, (*shape, 3))
    y, x = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
    h, w = rng.integers(4, 12, 2)
    im[y:y + h, x:x + w] *= rng.uniform(0.5, 1.3)
    return im.clip(0, 255).astype(np.uint8)


def by_hand(ims):
    "The normalisation done independently, in numpy: (x/255 - mean) / std, channels first."
    x = np.stack(ims).astype(np.float64) / 255
    return ((x - np.asarray(MEAN)) / np.asarray(STD)).transpose(0, 3, 1, 2)


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def backbone():
    torch.manual_seed(0)
    return timm.create_model(ARCH, num_classes=0, **KW).eval()


@pytest.fixture(scope='module')
def data():
    "SHOTS support and QUERIES query images of each colour class."
    rng = np.random.default_rng(0)
    ims = {c: [picture(v, rng) for _ in range(SHOTS + QUERIES)] for c, v in COLOURS.items()}
    support = [(im, c) for c in COLOURS for im in ims[c][:SHOTS]]
    query = [(im, c) for c in COLOURS for im in ims[c][SHOTS:]]
    return support, query


def classifier(backbone, **kw):
    return FewShotClassifier(backbone, SIZE, MEAN, STD, arch=ARCH, arch_kwargs=KW, **kw)


def write(ims, folder, names=None):
    "Save the uint8 images as PNG files in `folder`; their paths."
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / (n if names else f'{i}.png') for i, n in enumerate(names or ims)]
    for im, p in zip(ims, paths): Image.fromarray(im).save(p, format='PNG')
    return paths


@pytest.fixture(scope='module')
def fitted(backbone, data, tmp_path_factory):
    "A classifier fitted on the support images given as PNG files."
    support, _ = data
    paths = write([im for im, _ in support], tmp_path_factory.mktemp('support'))
    return classifier(backbone).fit(paths, [c for _, c in support])


def test_recovers_new_classes(fitted, data):
    _, query = data
    assert fitted.classes == list(COLOURS)  # in order of first appearance
    ims = [Image.fromarray(im) if i % 2 else im for i, (im, _) in enumerate(query)]  # PIL images and arrays
    labels, probs = fitted.predict(ims)
    truth = [c for _, c in query]
    assert len(labels) == len(truth) == len(COLOURS) * QUERIES and all(isinstance(l, str) for l in labels)
    assert np.mean([l == t for l, t in zip(labels, truth)]) >= 0.9
    p = fitted.predict_proba(ims)
    assert p.shape == (len(query), len(COLOURS))
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-5)
    assert ((probs > 0) & (probs <= 1)).all()
    np.testing.assert_allclose(probs, p.max(1), rtol=1e-6)
    assert labels == [fitted.classes[i] for i in p.argmax(1)]


@pytest.mark.parametrize('probe', ['sklearn', 'proto'])
def test_other_probes(backbone, data, probe):
    support, query = data
    clf = classifier(backbone, probe=probe).fit([im for im, _ in support], [c for _, c in support])
    labels, _ = clf.predict([im for im, _ in query])
    assert np.mean([l == c for l, (_, c) in zip(labels, query)]) >= 0.9


def test_inputs_agree(fitted, data, tmp_path):
    ims = [im for im, _ in data[1][::7]]
    paths = write(ims, tmp_path)
    u8 = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2)
    kinds = {'paths': paths, 'str paths': [str(p) for p in paths], 'pil': [Image.fromarray(im) for im in ims],
             'numpy': ims, 'numpy batch': np.stack(ims), 'uint8 batch': u8, 'float batch': u8.float() / 255,
             'float list': list(u8.double() / 255)}
    expected = by_hand(ims)
    for name, x in kinds.items():
        np.testing.assert_allclose(image_batch(x, InputSpec(SIZE, MEAN, STD)).numpy(), expected, atol=1e-5, err_msg=name)
    feats = {name: fitted.features(x) for name, x in kinds.items()}
    preds = {name: fitted.predict(x) for name, x in kinds.items()}
    for name in kinds:
        torch.testing.assert_close(feats[name], feats['paths'], atol=1e-5, rtol=0, msg=name)
        assert preds[name][0] == preds['paths'][0]
        np.testing.assert_allclose(preds[name][1], preds['paths'][1], atol=1e-5)


def test_resizes_and_converts(data, tmp_path):
    rng = np.random.default_rng(1)
    big = picture(COLOURS['red'], rng, (40, 56))   # not square, larger
    grey = big[..., 1]
    rgba = np.concatenate([big, np.full((*big.shape[:2], 1), 128, np.uint8)], -1)
    resized = np.asarray(Image.fromarray(big).resize((SIZE, SIZE), Image.BILINEAR))
    grey_resized = np.asarray(Image.fromarray(grey).resize((SIZE, SIZE), Image.BILINEAR))
    path = write([big], tmp_path)[0]
    x = image_batch([big, path, Image.fromarray(big), rgba, torch.from_numpy(big).permute(2, 0, 1), grey], InputSpec(SIZE, MEAN, STD))
    assert x.shape == (6, 3, SIZE, SIZE) and x.dtype == torch.float32
    np.testing.assert_allclose(x[:5].numpy(), by_hand([resized] * 5), atol=1e-5)
    np.testing.assert_allclose(x[5].numpy(), by_hand([np.repeat(grey_resized[..., None], 3, -1)])[0], atol=1e-5)
    # a float tensor is resized in float: within a rounding step of the uint8 resize
    xf = image_batch([torch.from_numpy(big).permute(2, 0, 1).float() / 255], InputSpec(SIZE, MEAN, STD))
    assert (xf - x[:1]).abs().max() <= 1 / 255 / min(STD) + 1e-5
    assert (xf - x[:1]).abs().max() > 0


def test_save_load_round_trip(fitted, data, tmp_path):
    path = tmp_path / 'clf.pt'
    fitted.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ['clf.pt']   # no temporary file left
    st = torch.load(path, weights_only=True)
    assert st['arch'] == ARCH and dict(st['arch_kwargs']) == KW and st['size'] == SIZE and st['probe'] == 'logistic'
    assert st['classes'] == list(COLOURS) and st['C'] == 3.
    np.testing.assert_allclose(st['mean'], MEAN) and np.testing.assert_allclose(st['std'], STD)
    torch.testing.assert_close(st['support'], fitted.support)
    assert st['support_labels'].tolist() == [i for i in range(len(COLOURS)) for _ in range(SHOTS)]
    ims = [im for im, _ in data[1]]
    p = fitted.predict_proba(ims)
    loaded = FewShotClassifier.load(path)
    assert loaded.classes == fitted.classes and loaded.input == fitted.input and loaded.input.size == SIZE
    np.testing.assert_array_equal(loaded.predict_proba(ims), p)
    fresh = FewShotClassifier.from_checkpoint(path)
    with pytest.raises(RuntimeError, match='fit'): fresh.predict(ims)
    support = data[0]
    fresh.fit([im for im, _ in support], [c for _, c in support])
    assert fresh.predict(ims)[0] == fitted.predict(ims)[0]
    np.testing.assert_allclose(fresh.predict_proba(ims), p, atol=1e-5)


def test_labels_of_any_kind(backbone, data, tmp_path):
    support, query = data
    keys = {c: (i, 'x') for i, c in enumerate(COLOURS)}   # tuples: stored as str
    clf = classifier(backbone).fit([im for im, _ in support], [keys[c] for _, c in support])
    assert clf.classes == list(keys.values())
    clf.save(tmp_path / 'c.pt')
    assert FewShotClassifier.load(tmp_path / 'c.pt').classes == [str(k) for k in keys.values()]
    ints = classifier(backbone).fit([im for im, _ in support], np.array([3 - list(COLOURS).index(c) for _, c in support]))
    assert ints.classes == [3, 2, 1, 0] and all(type(c) is int for c in ints.classes)


def test_arch_from_backbone(backbone, data, tmp_path):
    support = data[0]
    ims, labels = [im for im, _ in support], [c for _, c in support]
    torch.manual_seed(0)
    tagged = timm.create_model(ARCH, num_classes=0, **KW).eval()
    tagged.fsmtl_arch = {'arch': ARCH, 'kwargs': KW}
    FewShotClassifier(tagged, SIZE, MEAN, STD).fit(ims, labels).save(tmp_path / 'a.pt')
    assert FewShotClassifier.load(tmp_path / 'a.pt').classes == list(COLOURS)
    # timm's own record has the name but not the channels: saved, but the weights do not fit the default resnet10t
    FewShotClassifier(backbone, SIZE, MEAN, STD).save(tmp_path / 'b.pt')
    assert torch.load(tmp_path / 'b.pt', weights_only=True)['arch'] == ARCH
    with pytest.raises(ValueError, match='do not fit'): FewShotClassifier.load(tmp_path / 'b.pt')
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(ValueError, match='arch='): FewShotClassifier(plain, SIZE, MEAN, STD).fit(ims, labels).save(tmp_path / 'c.pt')
    assert not (tmp_path / 'c.pt').exists()


def test_bad_input(backbone, data, tmp_path):
    ims = [im for im, _ in data[0]]
    clf = classifier(backbone)
    with pytest.raises(RuntimeError, match=r'fit\(support, labels\)'): clf.predict(ims)
    with pytest.raises(ValueError, match='one class'): clf.fit(ims[:3], ['a'] * 3)
    with pytest.raises(ValueError, match='3 support images but 2 labels'): clf.fit(ims[:3], ['a', 'b'])
    with pytest.raises(ValueError, match='no support images'): clf.fit([], [])
    bad = tmp_path / 'broken.png'
    bad.write_text('not an image')
    with pytest.raises(ValueError, match='Cannot read image .*broken.png'): clf.fit([ims[0], bad], ['a', 'b'])
    with pytest.raises(ValueError, match='unknown probe'): classifier(backbone, probe='svm')
    with pytest.raises(FileNotFoundError, match='missing.pt'): FewShotClassifier.from_checkpoint(tmp_path / 'missing.pt')
    torch.save({'arch': ARCH, 'size': SIZE}, tmp_path / 'partial.pt')
    with pytest.raises(ValueError, match='partial.pt lacks arch_kwargs, backbone, mean, std'):
        FewShotClassifier.from_checkpoint(tmp_path / 'partial.pt')


@pytest.fixture(scope='module')
def folders(fitted, data, tmp_path_factory):
    "A checkpoint, a support folder of class folders and a query folder of shuffled names, with the true labels."
    root = tmp_path_factory.mktemp('cli')
    fitted.save(root / 'clf.pt')
    for c in COLOURS: write([im for im, l in data[0] if l == c], root / 'support' / c)
    order = np.random.default_rng(2).permutation(len(data[1]))
    names = [f'q{i:02d}.{"PNG" if i % 3 else "png"}' for i in order]
    write([im for im, _ in data[1]], root / 'query', names)
    (root / 'query' / 'notes.txt').write_text('not an image')
    return root, dict(zip(names, [c for _, c in data[1]]))


def test_cli_predict(folders, capsys):
    root, truth = folders
    out = root / 'pred.csv'
    assert main(['predict', '--checkpoint', str(root / 'clf.pt'), '--support', str(root / 'support'),
                 '--query', str(root / 'query'), '--out', str(out)]) == 0
    lines = [l.split('\t') for l in capsys.readouterr().out.splitlines()]
    assert [l[0] for l in lines] == sorted(truth) == [p.name for p in image_files(root / 'query')]
    assert np.mean([truth[f] == label for f, label, _ in lines]) >= 0.9
    assert all(0 < float(p) <= 1 and len(p.split('.')[1]) == 4 for _, _, p in lines)
    with open(out, newline='') as f: rows = list(csv.reader(f))
    assert rows[0] == ['file', 'label', 'probability'] and rows[1:] == lines


def test_cli_predict_bad_input(folders, tmp_path, capsys):
    root, _ = folders
    def run(support, query, checkpoint=root / 'clf.pt', *more):
        code = main(['predict', '--checkpoint', str(checkpoint), '--support', str(support), '--query', str(query), *more])
        return code, capsys.readouterr().err
    one = tmp_path / 'one'
    write([np.zeros((8, 8, 3), np.uint8)], one / 'only')
    code, err = run(one, root / 'query')
    assert code == 2 and 'has 1 class folder(s)' in err
    (one / 'empty').mkdir()
    code, err = run(one, root / 'query')
    assert code == 2 and 'hold no images' in err and str(one / 'empty') in err
    (tmp_path / 'noquery').mkdir()
    code, err = run(root / 'support', tmp_path / 'noquery')
    assert code == 2 and 'noquery holds no images' in err
    bad = tmp_path / 'badquery'
    write([np.zeros((8, 8, 3), np.uint8)], bad)
    (bad / 'zz.png').write_text('not an image')
    code, err = run(root / 'support', bad)
    assert code == 0 and 'skipped' in err and 'zz.png' in err   # the readable query is still classified
    code, err = run(root / 'support', root / 'query', tmp_path / 'nothing.pt')
    assert code == 2 and 'No checkpoint file' in err and 'nothing.pt' in err
    code, err = run(root / 'support', tmp_path / 'nowhere')
    assert code == 2 and 'No folder' in err


DATA = Path(__file__).parent / 'data'


def test_a_checkpoint_written_by_earlier_code_is_read_back_with_its_input(glyph_root):
    "A pretrained run's best.pth written before `InputSpec` (tests/data/make_main_run.py): the same input, features and test."
    old, ref = DATA / 'main_run_best.pth', torch.load(DATA / 'main_run_features.pt')
    clf = FewShotClassifier.from_checkpoint(old)
    # as the file records it: loaded at 32, resized to 36 by resnet10t's bicubic filter, ImageNet's statistics
    assert clf.input == InputSpec(36, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 32, 'bicubic')
    torch.testing.assert_close(clf.features([im.numpy() for im in ref['images']]), ref['features'], rtol=0, atol=0)
    res = evaluate_checkpoint(old, root=str(glyph_root), final_test_epoch_length=6, test_queries=2, progress=False)
    assert {s: r.accs.tolist() for s, r in res.items()} == {s: a.tolist() for s, a in ref['test'].items()}
