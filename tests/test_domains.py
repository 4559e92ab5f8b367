"torchvision datasets and Omniglot as few-shot benchmarks, and the cross-domain test from Python and the shell."
import contextlib
import dataclasses
import json
from unittest import mock

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd
from PIL import Image

from fsmtl.checkpoint import backbone_from_checkpoint, read_checkpoint
from fsmtl.cli import main
from fsmtl.data.benchmarks import get_benchmark
from fsmtl.data.block import episode_dl
from fsmtl.data.core import SPLITS
from fsmtl.data.download import DataUnavailable
from fsmtl.data.torchvision_domains import TORCHVISION_DATASETS
from fsmtl.domains import domain_splits, evaluate_domains
from fsmtl.evaluate import evaluate
from fsmtl.probe import get_probe
from fsmtl.train import train
from helpers import coded_splits, shapes_folder
from torchvision_fakes import FAKES, eurosat

SIZE = 20
pytestmark = pytest.mark.usefixtures('one_thread')


@contextlib.contextmanager
def md5_unchecked(modules):
    "torchvision's md5 check of `modules`' files passed, as torchvision's own dataset tests patch it."
    with contextlib.ExitStack() as stack:
        for m in modules: stack.enter_context(mock.patch(f'torchvision.datasets.{m}.check_integrity', return_value=True))
        yield


def fake(name, root):
    "Write the fake files of `name` under `root`; the context in which torchvision reads them."
    write, patched = FAKES[name]
    write(root)
    return md5_unchecked(patched)


def reference(name, root):
    "(class name, resized image) of every image of every part, as torchvision's own dataset objects return them."
    spec = TORCHVISION_DATASETS[name]
    out = {}
    for p, kw in enumerate(spec.parts):
        ds = getattr(tvd, name)(root, **kw)
        names = getattr(ds, 'classes', None) or getattr(ds, '_characters', None)
        for j in range(len(ds)):
            im, y = ds[j]
            out[(p, j)] = (str(names[y]) if names else f'class {y}', np.asarray(im.convert('RGB').resize((SIZE, SIZE), Image.BILINEAR)))
    return out


@pytest.mark.parametrize('name', list(FAKES))
def test_torchvision_benchmark(tmp_path, name):
    "Every image once, in the class torchvision gives it, with its pixels; classes split disjointly; episodes stay in a split."
    with fake(name, tmp_path):
        splits = get_benchmark(f'torchvision:{name}', tmp_path, download=False, size=SIZE, ratios=(0.4, 0.2, 0.4))
        ref = reference(name, tmp_path)
        seen = set()
        for s in SPLITS:
            split = splits[s]
            keys = [tuple(int(v) for v in k) for k in split.items.index]
            seen.update(keys)
            ims = split.load(np.arange(len(split)))
            for k, label, im in zip(keys, split.labels, ims):
                assert split.classes[label] == ref[k][0]
                np.testing.assert_array_equal(im, ref[k][1])
        assert seen == set(ref) and sum(len(splits[s]) for s in SPLITS) == len(ref)
        classes = {c for c, _ in ref.values()}
        assert sorted(c for s in SPLITS for c in splits[s].classes) == sorted(classes)
        assert all(splits[s].n_classes >= 1 for s in SPLITS)
        # episodes of the test classes hold only test images: their labels are the test split's global ids
        dl = episode_dl(splits, 'test', ways=2, shots=1, queries=1, n=3, device='cpu', num_workers=0)
        first = splits.train.n_classes + splits.val.n_classes
        y = torch.cat([b[1] for b in dl])
        assert ((y >= first) & (y < first + splits.test.n_classes)).all()


def test_split_ratios_and_test_only(tmp_path):
    "Shares of the classes as asked, the same for one seed, another draw for another; test_only puts all in test."
    with fake('EuroSAT', tmp_path):
        splits = get_benchmark('torchvision:eurosat', tmp_path, download=False, ratios=(4, 2, 1))
        assert [splits[s].n_classes for s in SPLITS] == [4, 2, 1]   # 7 classes: round(7 * 2/7) val, round(7 * 1/7) test
        again = get_benchmark('torchvision:EuroSAT', tmp_path, download=False, ratios=(4, 2, 1))
        assert all(splits[s].classes == again[s].classes for s in SPLITS)
        draws = {tuple(get_benchmark('torchvision:EuroSAT', tmp_path, download=False, seed=k).test.classes) for k in range(6)}
        assert len(draws) > 1
        every = get_benchmark('torchvision:EuroSAT', tmp_path, download=False, split='test_only')
        assert every.test.classes == [f'Land{c}' for c in range(7)] and len(every.test) == 42
        assert len(every.train) == len(every.val) == 0 and every.train.image_size() == 64   # EuroSAT's 64px


def test_omniglot_lake_split(tmp_path):
    "Test classes are torchvision's evaluation characters, train and val its background ones."
    with fake('Omniglot', tmp_path):
        splits = get_benchmark('torchvision:Omniglot', tmp_path, download=False)
        background = set(tvd.Omniglot(tmp_path, background=True)._characters)
        evaluation = set(tvd.Omniglot(tmp_path, background=False)._characters)
    assert set(splits.test.classes) == evaluation
    assert set(splits.train.classes) | set(splits.val.classes) == background
    assert (splits.train.n_classes, splits.val.n_classes) == (7, 2)   # 9 background characters by 0.6 : 0.2
    assert splits.test.image_size() == 28


def test_offline_names_the_files(tmp_path):
    "No files and no download: torchvision's message, where it reads, and how to download."
    with pytest.raises(DataUnavailable) as e: get_benchmark('torchvision:EuroSAT', tmp_path, download=False)
    msg = str(e.value)
    assert 'Dataset not found' in msg and str(tmp_path / 'eurosat' / '2750') in msg and '--download' in msg


@pytest.mark.parametrize('name, says', [('Nope', "no dataset 'Nope'"), ('VOCDetection', 'object detection'),
                                        ('voc_segmentation', 'no dataset'), ('VOCSegmentation', 'segmentation'),
                                        ('ImageNet', 'not read by fsmtl')])
def test_unknown_or_not_classification(tmp_path, name, says):
    "Refused before any file is read, with the supported names."
    with pytest.raises(ValueError) as e: get_benchmark(f'torchvision:{name}', tmp_path)
    assert says in str(e.value) and 'EuroSAT, Flowers102' in str(e.value)



@pytest.fixture(scope='module')
def run(glyph_root, tmp_path_factory):
    "A run folder with a glyph-trained tiny backbone (one short epoch)."
    tmp = tmp_path_factory.mktemp('domains-run')
    res = train(dataset='glyphs-small', root=str(glyph_root), log_dir=str(tmp), run_name='run', max_epochs=1,
                model_kwargs=dict(channels=(8, 16, 16, 32)), meta_batch_size=2, epoch_length=4, val_epoch_length=2,
                final_test_epoch_length=2, scheduler='one_cycle', progress=False, gpu=-1)
    return res


@pytest.fixture(scope='module')
def domains_root(tmp_path_factory):
    "EuroSAT in torchvision's layout, and a folder of shape classes."
    root = tmp_path_factory.mktemp('domains-data')
    eurosat(root, per_class=8)
    shapes_folder(root / 'shapes', per_class=8)
    return root


def test_own_benchmark_keeps_its_test_classes(run, glyph_root):
    "A learner on its own benchmark: its test classes only, scored as `evaluate` scores its DataLoaders' test split."
    res = evaluate_domains(run.learner, ['glyphs-small'], root=glyph_root, queries=2, episodes=4, progress=False)
    want = evaluate(run.learner, run.learner.dls.splits, queries=2, episodes=4, progress=False)
    assert res.classes['glyphs-small'] == run.learner.dls.splits.test.n_classes
    for s in (1, 5): assert res['glyphs-small'][s].mean == pytest.approx(want[s].mean, abs=1e-6)


@pytest.mark.parametrize('domain,own', [('glyphs', 'glyphs-small'), ('glyphs-small', 'glyphs'), ('Glyphs_Small', 'glyphs-small')])
def test_a_benchmark_with_the_same_classes_keeps_its_test_classes(glyph_root, domain, own):
    "glyphs and glyphs-small hold the same classes: a backbone trained on either is tested on the other's test classes."
    small = get_benchmark('glyphs-small', root=glyph_root)
    with mock.patch('fsmtl.domains.get_benchmark', return_value=small):   # not rendering glyphs' 300 a class here
        got = domain_splits(domain, glyph_root, own=own)
    assert set(got.test.classes) == set(small.test.classes) and got.test.n_classes == 114
    assert domain_splits('glyphs-small', glyph_root, own='cifarfs').test.n_classes == 250 + 87 + 114   # not its own: all


def test_shell_equals_python(run, domains_root, capsys):
    "fsmtl test over two domains: one table, a JSON per domain, EuroSAT's numbers those `evaluate` gives on its episodes."
    run = run.run_dir
    shapes = f"folder:{domains_root / 'shapes'}"
    args = ['test', '--load_path', str(run), '--dataset', 'torchvision:EuroSAT', '--dataset', shapes, '--root',
            str(domains_root), '--final_test_epoch_length', '6', '--test_queries', '2', '--num_workers', '0', '--gpu', '-1']
    assert main(args) == 0
    out = capsys.readouterr().out
    assert '| torchvision:EuroSAT | 7 |' in out and f'| {shapes} | 10 |' in out and '| 1-shot | 5-shot |' in out
    assert [d['domain'] for d in json.loads((run / 'test_domains.json').read_text())] == ['torchvision:EuroSAT', shapes]
    (folder_json,) = run.glob('test_folder-*-shapes.json')
    assert json.loads(folder_json.read_text())['classes'] == 10
    got = json.loads((run / 'test_torchvision-EuroSAT.json').read_text())
    # the reference: EuroSAT's classes all in test, at the checkpoint's side and statistics, scored by `evaluate`
    st = read_checkpoint(run, prefer='best')
    splits = get_benchmark('torchvision:EuroSAT', domains_root, download=False, split='test_only', size=st['image_size'])
    splits = dataclasses.replace(splits, mean=tuple(st['mean']), std=tuple(st['std']))
    want = evaluate(backbone_from_checkpoint(st, run), splits, ways=5, shots=(1, 5), queries=2, episodes=6, seed=0,
                    probe=get_probe('l2', 3.), progress=False)
    assert got['episodes'] == 6 and got['ways'] == 5 and got['classes'] == 7
    for s in (1, 5): assert got[f'{s}shot']['mean'] == pytest.approx(want[s].mean, abs=1e-6)


def test_all_classes_in_test():
    "A benchmark tested as another domain: the classes of its three splits, with their images, all in test."
    splits = coded_splits(n_train=3, n_val=2, n_test=2, per_class=4)
    every = domain_splits(splits, split='test_only')
    assert every.test.classes == splits.train.classes + splits.val.classes + splits.test.classes
    want = np.concatenate([splits[s].items for s in SPLITS])
    np.testing.assert_array_equal(every.test.load(np.arange(len(every.test))), want)
    assert len(every.train) == len(every.val) == 0


def test_bad_domains_refused_before_work(run, domains_root, capsys):
    "Fewer classes than ways, or an unknown name: one line on stderr, exit 2, nothing scored."
    run = run.run_dir
    args = ['test', '--load_path', str(run), '--root', str(domains_root), '--gpu', '-1']
    for bad in (['--dataset', 'torchvision:EuroSAT', '--test_ways', '8'], ['--dataset', 'torchvision:VOCSegmentation'],
                ['--dataset', 'torchvision:EuroSAT', '--bscd']):
        assert main(args + bad) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and '8-way tasks need 8 classes but the test split of torchvision:EuroSAT has 7' in err[0]
    assert 'segmentation' in err[1] and 'tasks need 65 images a class' in err[2]


def test_run_folder_of_a_domain_is_one_folder(tmp_path):
    "A run on 'folder:PATH' or 'torchvision:NAME' gets one plain folder in log_dir."
    from fsmtl.runs import run_folder
    for dataset in ('folder:/data/my shapes', 'torchvision:EuroSAT'):
        d = run_folder(dict(run_name=None, dataset=dataset, arch='resnet12', log_dir=str(tmp_path)))
        assert d.parent == tmp_path.resolve() and ':' not in d.name and '/' not in d.name
