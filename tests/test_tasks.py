import numpy as np
import pytest
import torch

from fsmtl.data.block import mtl_dls
from fsmtl.data.core import FewShotSplits
from fsmtl.data.tasks import local_labels
from helpers import coded_split, coded_splits

SMALL = dict(val_episodes=6, test_episodes=5, device='cpu', augment=False)


def codes(x):
    "The (split, class, index) code in pixel (0, 0) of un-normalised, un-augmented images."
    return x[:, :, 0, 0].round().long()


def raw(dl, b):
    "Undo the normalisation by hand, back to 0..255."
    mean, std = torch.tensor([.4, .5, .6]).view(1, 3, 1, 1), torch.tensor([.2, .25, .3]).view(1, 3, 1, 1)
    return (b[0].as_subclass(torch.Tensor) * std + mean) * 255


def test_training_batches_hold_whole_tasks():
    sp = coded_splits()
    dls = mtl_dls(sp, train_ways=4, train_shots=3, train_queries=2, meta_batch_size=3, epoch_length=30, **SMALL)
    assert len(dls.train) == 10
    for b in dls.train:
        x, y = b
        assert x.shape == (3 * 4 * 5, 3, 32, 32) and y.shape == (60,)
        c = codes(raw(dls.train, b))
        assert (c[:, 0] == 1).all()                      # base classes only
        assert torch.equal(c[:, 1], y.as_subclass(torch.Tensor))  # y is the image's own base-class id
        per_task = y.view(3, 4, 5)
        assert (per_task == per_task[:, :, :1]).all()    # class-major: 5 images of one class in a row
        for t in per_task: assert len(set(t[:, 0].tolist())) == 4   # 4 distinct classes a task
        for t in c[:, 2].view(3, 4, 5): assert all(len(set(k.tolist())) == 5 for k in t)  # distinct images


def test_fresh_tasks_every_time():
    dls = mtl_dls(coded_splits(), meta_batch_size=2, epoch_length=20, **SMALL)
    a = torch.cat([y for _, y in dls.train]); b = torch.cat([y for _, y in dls.train])
    assert not torch.equal(a, b)


def buggy_in_place_relabel(y):
    "The original's relabelling: one class at a time, in order of appearance, in place."
    y = y.clone()
    for i, c in enumerate(dict.fromkeys(y.tolist())): y[y == c] = i
    return y


def test_local_labels_never_merge_classes():
    # a base split of exactly 5 classes: every task's global ids are 0..4, the case that broke in-place relabelling
    sp = FewShotSplits('five', coded_split(5, 12, 1), coded_split(5, 25, 2), coded_split(5, 25, 3))
    dls = mtl_dls(sp, train_ways=5, train_shots=2, train_queries=3, meta_batch_size=8, epoch_length=400, **SMALL)
    merged = 0
    for _, y in dls.train:
        loc = local_labels(y, 5, 5).view(8, 5, 5)
        assert (loc == torch.arange(5).view(1, 5, 1)).all()
        for t in y.view(8, 25):
            merged += len(buggy_in_place_relabel(t).unique()) < 5
        # a bijection between the task's global ids and 0..4
        for g, l in zip(y.view(8, 25), loc.view(8, 25)):
            assert len({(a, b) for a, b in zip(g.tolist(), l.tolist())}) == 5
    assert merged > 0  # the test data does trigger the original's bug


def test_episodes_fixed_across_epochs_and_runs():
    sp = coded_splits()
    kw = dict(test_shots=(1, 5), test_queries=4, meta_batch_size=2, epoch_length=4, **SMALL)
    a, b = mtl_dls(sp, seed=3, **kw), mtl_dls(sp, seed=3, **kw)
    ys = lambda dl: torch.cat([codes(raw(dl, bt))[:, 2] for bt in dl])
    assert torch.equal(ys(a.valid), ys(a.valid)) and torch.equal(ys(a.valid), ys(b.valid))
    assert torch.equal(ys(a[2]), ys(b[2]))
    assert not torch.equal(ys(a.valid), ys(mtl_dls(sp, seed=4, **kw).valid))
    assert a.valid.episodes.shape == (6, 5 * (5 + 4))     # the largest shot count is drawn


def test_episode_labels_are_global_novel_ids():
    sp = coded_splits(n_train=12, n_val=6, n_test=7)
    dls = mtl_dls(sp, test_ways=3, test_shots=2, test_queries=3, meta_batch_size=2, epoch_length=4, **SMALL)
    for k, (dl, code, offset) in enumerate([(dls.valid, 2, 12), (dls[2], 3, 18)]):
        b = dl.one_batch()
        c = codes(raw(dl, b))
        assert (c[:, 0] == code).all()
        assert torch.equal(c[:, 1] + offset, b[1].as_subclass(torch.Tensor))
        assert [dls.vocab[i] for i in b[1][:1].tolist()] == [sp[('val', 'test')[k]].classes[int(c[0, 1])]]


def test_datablock_item_matches_loader():
    sp = coded_splits()
    dls = mtl_dls(sp, **SMALL)
    im, cat = dls.train_ds[7]
    assert np.array_equal(np.asarray(im), sp.train.items[7]) and dls.vocab[int(cat)] == sp.train.classes[sp.train.labels[7]]
    im, cat = dls.valid_ds[3]
    assert np.array_equal(np.asarray(im), sp.val.items[3]) and dls.vocab[int(cat)] == sp.val.classes[sp.val.labels[3]]


def test_show_batch_rows_are_tasks():
    import matplotlib; matplotlib.use('Agg')
    dls = mtl_dls(coded_splits(), train_ways=4, meta_batch_size=3, **SMALL)
    b = dls.train.one_batch()
    import matplotlib.pyplot as plt
    plt.close('all')
    assert dls.train.show_batch(b, max_n=2) is None   # nothing to echo in a notebook, as fastai's
    axs = plt.gcf().axes
    assert len(axs) == 2 * 4
    want = [dls.vocab[i] for i in b[1].view(3, 4, 10)[:2, :, 0].flatten().tolist()]
    assert [ax.get_title() for ax in axs] == want


@pytest.mark.parametrize('kw, msg', [
    (dict(train_ways=13), '13 classes but the train split'),
    (dict(test_ways=7), '7 classes but the val split'),
    (dict(train_shots=20, train_queries=6), '26 images a class'),
    (dict(test_shots=(1, 20), test_queries=6), '26 images a class'),
    (dict(meta_batch_size=8, epoch_length=4), 'epoch_length'),
])
def test_bad_task_sizes(kw, msg):
    with pytest.raises(ValueError, match=msg): mtl_dls(coded_splits(), **{**SMALL, **kw})


def test_short_class_is_named():
    sp = coded_splits()
    sp.train.labels[:20] = 0  # class 1 keeps 5 images... relabel so that one class is short
    sp.train.labels[25:45] = 0
    with pytest.raises(ValueError, match="s1c1"): mtl_dls(sp, **SMALL)


def test_batches_go_to_fastais_default_device():
    from fastai.torch_core import default_device
    dls = mtl_dls(coded_splits(), val_episodes=2, test_episodes=2)
    assert dls.device == default_device() and dls.train.one_batch()[0].device.type == default_device().type
