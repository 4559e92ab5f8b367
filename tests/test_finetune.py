"Pretrained timm backbones fine-tuned the fastai way: the model's own input, the splitter, freezing, export, test-time fine-tuning."
import copy
import json

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms.v2.functional as TF
import fastai.callback.hook  # noqa: F401 (Learner.summary)
from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler
from fastai.learner import load_learner
from fastai.torch_core import set_seed
from fastai.vision.core import TensorImage

from fsmtl.checkpoint import Checkpoints
from fsmtl.classifier import FewShotClassifier, image_batch
from fsmtl.data.block import episode_dl, mtl_dls
from fsmtl.evaluate import evaluate
from fsmtl.features import extract_features
from fsmtl.learner import mtl_learner
from fsmtl.train import evaluate_checkpoint, train
from helpers import TEST_SEED, assert_gain, coded_splits, shapes_folder

pytestmark = pytest.mark.usefixtures('one_thread')
ARCH = dict(channels=(8, 8, 16, 16))   # a tiny resnet10t: timm's group_matcher has a stem and four stages


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    "A resnet10t weights file, as a user would bring one, with BN statistics that differ from a fresh model's."
    torch.manual_seed(1)
    m = timm.create_model('resnet10t', num_classes=0, **ARCH)
    for b in m.modules():
        if isinstance(b, torch.nn.BatchNorm2d): b.running_mean.uniform_(-.1, .1); b.running_var.uniform_(.5, 1.5)
    path = tmp_path_factory.mktemp('weights') / 'resnet10t.pth'
    torch.save(m.state_dict(), path)
    return path


def _dls(stored=32, **kw):
    return mtl_dls(coded_splits(n_train=6, n_val=5, n_test=5, per_class=10, size=stored), train_ways=3, train_shots=2,
                   train_queries=2, meta_batch_size=2, epoch_length=4, test_ways=3, test_shots=2, test_queries=2,
                   val_episodes=2, test_episodes=2, device='cpu', **kw)


def test_pretrained_input_follows_the_model_config(weights):
    dls = _dls()   # stored at 32 px
    learn = mtl_learner(dls, arch='resnet10t', arch_kwargs=ARCH, pretrained=weights, size=48)
    st = torch.load(weights)
    assert all(torch.equal(v, st[k]) for k, v in learn.model.backbone.state_dict().items())
    # size given by the user, mean, std and interpolation from timm's pretrained config of resnet10t
    cfg = timm.create_model('resnet10t', num_classes=0).pretrained_cfg
    s = dls.splits
    assert (s.size, s.mean, s.std, s.interpolation) == (48, cfg['mean'], cfg['std'], cfg['interpolation'])
    raw = torch.from_numpy(dls.splits.val.items[:4]).permute(0, 3, 1, 2).contiguous()
    x = dls.valid.after_batch(TensorImage(raw.clone()))
    # reference: torchvision's resize of the float images, then (x - mean) / std by hand
    ref = TF.resize(raw.float() / 255, [48, 48], interpolation=TF.InterpolationMode.BICUBIC, antialias=False).clamp(0, 1)
    ref = (ref - torch.tensor(cfg['mean']).view(3, 1, 1)) / torch.tensor(cfg['std']).view(3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-5)
    assert dls.train.one_batch()[0].shape[-2:] == (48, 48)
    assert episode_dl(dls.splits, 'test', 3, 2, 2, n=1).one_batch()[0].shape[-2:] == (48, 48)


def test_an_84px_benchmark_served_at_the_configured_size():
    splits84 = coded_splits(n_train=6, n_val=5, n_test=5, per_class=10, size=84)
    dls = mtl_dls(splits84, train_ways=3, train_shots=2, train_queries=2, meta_batch_size=2, epoch_length=4, test_ways=3,
                  test_shots=2, test_queries=2, val_episodes=2, test_episodes=2, device='cpu')
    mtl_learner(dls, arch='resnet10t', arch_kwargs=ARCH, size=112, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert dls.train.one_batch()[0].shape[-2:] == (112, 112) and splits84.size == 84   # the user's splits untouched
    # at the stored size nothing is resized: the batch is (x / 255 - mean) / std, by hand in numpy
    same = _dls()
    mtl_learner(same, arch='resnet10t', arch_kwargs=ARCH, mean=(0.3, 0.4, 0.5), std=(0.2, 0.3, 0.4))
    raw = same.splits.val.items[:3]
    x = same.valid.after_batch(TensorImage(torch.from_numpy(raw).permute(0, 3, 1, 2).contiguous()))
    ref = (raw / 255. - np.array([0.3, 0.4, 0.5])) / np.array([0.2, 0.3, 0.4])
    assert np.allclose(x.permute(0, 2, 3, 1).numpy(), ref, atol=1e-5)


class _FirstLRs(Callback):
    order = ParamScheduler.order + 1   # after the schedule has set the batch's rates
    "Keeps the optimiser's learning rate of each parameter group at the first training batch."
    def before_batch(self):
        if self.training and not hasattr(self, 'lrs'): self.lrs = [h['lr'] for h in self.opt.hypers]


@pytest.mark.parametrize('train_bn', [True, False])
def test_a_frozen_epoch_trains_the_head_only(weights, train_bn):
    learn = mtl_learner(_dls(), arch='resnet10t', arch_kwargs=ARCH, pretrained=weights, size=32, train_bn=train_bn)
    before, head = copy.deepcopy(learn.model.backbone.state_dict()), learn.model.head.detach().clone()
    learn.freeze()
    learn.fit_one_cycle(1, 1e-2)
    after = learn.model.backbone.state_dict()
    norms = [n for n, m in learn.model.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bn = {k for k in after if k.rsplit('.', 1)[0] in norms}   # BN weights, biases and statistics
    assert not torch.equal(head, learn.model.head)
    assert all(torch.equal(before[k], v) for k, v in after.items() if k not in bn)
    moved = [k for k in bn if not torch.equal(before[k], after[k])]
    assert (len(moved) > 0) == train_bn
    # unfrozen, one_cycle starts each group at its slice rate / 25: geometric from lo to hi over stem, 4 stages, head
    learn.unfreeze()
    cb = _FirstLRs()
    learn.fit_one_cycle(1, slice(1e-5, 1e-3), cbs=cb)
    assert len(learn.opt.param_groups) == 6
    assert np.allclose(cb.lrs, np.geomspace(1e-5, 1e-3, 6) / 25)


def test_lr_find_writes_no_checkpoint_and_puts_the_weights_back(weights, tmp_path):
    learn = mtl_learner(_dls(), arch='resnet10t', arch_kwargs=ARCH, pretrained=weights, size=32, path=tmp_path,
                        cbs=[Checkpoints(tmp_path / 'run')])
    before = copy.deepcopy(learn.model.state_dict())
    lrs = learn.lr_find(num_it=8, show_plot=False)
    assert 1e-7 < lrs.valley < 10 and len(learn.recorder.lrs) == 8
    assert not (tmp_path / 'run').exists()   # no checkpoint of an lr_find run
    assert all(torch.equal(v, before[k]) for k, v in learn.model.state_dict().items())   # weights put back


def test_summary_and_export_then_load_learner(weights, tmp_path):
    dls = _dls()
    learn = mtl_learner(dls, arch='resnet10t', arch_kwargs=ARCH, pretrained=weights, size=40, path=tmp_path)
    text = learn.summary()
    n = sum(p.numel() for p in learn.model.backbone.parameters())   # fastai's summary counts the layers' parameters
    assert 'MTLModel' in text and f"Total params: {n:,}" in text and '40 x 40' in text
    learn.export('export.pkl')
    loaded = load_learner(tmp_path / 'export.pkl')
    x = dls.valid.one_batch()[0][:6]
    loaded.model.eval(); learn.model.eval()
    with torch.no_grad(): assert torch.equal(loaded.model.backbone(x), learn.model.backbone(x))
    clf = FewShotClassifier.from_learner(loaded)
    assert (clf.input.size, clf.input.mean, clf.input.std) == (40, tuple(dls.splits.mean), tuple(dls.splits.std))
    ims = list(dls.splits.test.items[:6])
    clf.fit(ims, [0, 0, 1, 1, 2, 2])
    assert clf.predict(ims)[0] == FewShotClassifier.from_learner(learn).fit(ims, [0, 0, 1, 1, 2, 2]).predict(ims)[0]


def test_test_time_finetuning_changes_only_a_copy(weights):
    torch.manual_seed(0)
    backbone = timm.create_model('resnet10t', num_classes=0, **ARCH)
    backbone.load_state_dict(torch.load(weights))
    stored = copy.deepcopy(backbone.state_dict())
    splits = coded_splits(n_train=6, n_val=5, n_test=5, per_class=10, size=32)
    ims, labels = list(splits.test.items[:30]), splits.test.labels[:30].tolist()
    support, query, ys = ims[::2], ims[1::2], labels[::2]
    kw = dict(size=32, mean=splits.mean, std=splits.std)
    plain = FewShotClassifier(backbone, **kw).fit(support, ys)
    tuned = FewShotClassifier(backbone, finetune_steps=3, finetune_lr=0.05, **kw).fit(support, ys)
    assert all(torch.equal(v, stored[k]) for k, v in backbone.state_dict().items())
    assert any(not torch.equal(v, stored[k]) for k, v in tuned.finetuned.state_dict().items())
    # the same classifier on the fine-tuned copy predicts the same: the copy is the only difference from the plain probe
    same = FewShotClassifier(tuned.finetuned, **kw).fit(support, ys)
    assert np.allclose(tuned.predict_proba(query), same.predict_proba(query), atol=1e-5)
    assert not np.allclose(tuned.predict_proba(query), plain.predict_proba(query), atol=1e-3)
    # a learning rate of 0 leaves the copy as the backbone (batch-norm statistics are kept as trained): the plain probe
    still = FewShotClassifier(backbone, finetune_steps=2, finetune_lr=0., **kw).fit(support, ys)
    assert np.allclose(still.predict_proba(query), plain.predict_proba(query), atol=1e-5)
    # evaluate: the same episodes, with and without fine-tuning at rate 0, score the same
    args = dict(split='test', ways=3, shots=(1, 2), queries=3, episodes=3, progress=False)
    a, b = evaluate(backbone, splits, **args), evaluate(backbone, splits, finetune_steps=1, finetune_lr=0., **args)
    assert all(np.allclose(a[s].accs, b[s].accs) for s in (1, 2))


@pytest.mark.slow
def test_train_with_pretrained_weights_and_frozen_epochs(weights, glyph_root, tmp_path):
    from fsmtl.cli import main
    args = ['train', '--dataset', 'glyphs-small', '--root', str(glyph_root), '--log_dir', str(tmp_path / 'runs'), '--run_name', 'r', '--model', 'resnet10t',
            '--model_kwargs', json.dumps(ARCH), '--pretrained', str(weights), '--freeze_epochs', '1', '--size', '36',
            '--max_epochs', '1', '--scheduler', 'one_cycle', '--epoch_length', '4', '--meta_batch_size', '2',
            '--val_epoch_length', '2', '--final_test_epoch_length', '2', '--test_queries', '2', '--gpu', '-1',
            '--original_head']   # a random head: the backbone gets gradients from the first unfrozen step
    assert main(args) == 0
    run = tmp_path / 'runs' / 'r'
    cfg = json.loads((run / 'config.json').read_text())
    assert cfg['freeze_epochs'] == 1 and cfg['pretrained'] == str(weights) and cfg['size'] == 36
    last, st = torch.load(run / 'last.pth', weights_only=True), torch.load(weights)
    assert last['size'] == 36 and last['mean'] == list(timm.create_model('resnet10t').pretrained_cfg['mean'])
    # the only epoch was frozen: the backbone's convolutions are the file's
    convs = [k for k, v in st.items() if k.endswith('.weight') and v.dim() == 4]
    assert all(torch.equal(last['backbone'][k], st[k]) for k in convs)
    # resumed for a second epoch, with the run's own options: past the frozen epoch, the convolutions train
    res = train(resume=True, load_path=str(run), max_epochs=2, progress=False)
    assert res.config.fit.freeze_epochs == 1 and res.config.data.size == 36 and len(res.history) == 2
    last = torch.load(run / 'last.pth', weights_only=True)
    assert last['epoch'] == 2 and not any(torch.equal(last['backbone'][k], st[k]) for k in convs)
    # `fsmtl test` serves the checkpoint's recorded input: the same accuracies as the run's own final test
    again = evaluate_checkpoint(run, progress=False)
    assert all(np.array_equal(again[s].accs, res.test[s].accs) for s in (1, 5))
    # FewShotClassifier serves images as training did: loaded at the benchmark's 32 px, then resized to 36 by the
    # model's bicubic filter; the reference is torchvision's resize and normalisation by hand
    clf = FewShotClassifier.from_checkpoint(run)
    assert (clf.input.size, clf.input.image_size, clf.input.interpolation) == (36, 32, "bicubic") and last["image_size"] == 32
    raw = res.learner.dls.splits.test.load(list(range(4)))
    ref = TF.resize(torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255, [36, 36],
                    interpolation=TF.InterpolationMode.BICUBIC, antialias=False).clamp(0, 1)
    ref = (ref - torch.tensor(clf.input.mean).view(3, 1, 1)) / torch.tensor(clf.input.std).view(3, 1, 1)
    assert torch.allclose(image_batch(list(raw), clf.input), ref, atol=1e-5)
    # the same input as the final test's batches: the same features
    x = res.learner.dls[2].after_batch(TensorImage(torch.from_numpy(raw).permute(0, 3, 1, 2).contiguous()))
    assert torch.allclose(clf.features(list(raw)), extract_features(clf.backbone, x), atol=1e-5)
    # saved and loaded, it keeps that input
    clf.fit(list(raw), [0, 0, 1, 1]).save(tmp_path / 'clf.pth')
    assert FewShotClassifier.load(tmp_path / 'clf.pth').input == clf.input


def test_a_pretrained_run_on_a_folder_is_tested_at_the_size_it_trained_at(weights, tmp_path):
    # a folder loads at 84 px unless told: trained at --size 36, its test must load the folder at 36 px too
    folder = shapes_folder(tmp_path / 'shapes')
    res = train(dataset='folder', root=str(folder), log_dir=str(tmp_path / 'runs'), run_name='r', model='resnet10t',
                model_kwargs=ARCH, pretrained=str(weights), size=36, max_epochs=1, scheduler='one_cycle', epoch_length=2,
                meta_batch_size=2, train_ways=3, test_ways=3, val_epoch_length=2, final_test_epoch_length=12, test_queries=5,
                gpu=-1, progress=False, seed=TEST_SEED)
    assert res.learner.dls.splits.test.image_size() == 36
    again = evaluate_checkpoint(res.run_dir, root=str(folder), progress=False)
    for s in (1, 5): np.testing.assert_array_equal(again[s].accs, res.test[s].accs)


@pytest.mark.statistical
@pytest.mark.slow
def test_fine_tune_from_pretrained_beats_from_scratch(tmp_path):
    # "pretrained" weights: a small resnet10t trained briefly by MTL on other drawings of the same kind of shapes
    kw = dict(arch='resnet10t', arch_kwargs=dict(channels=(16, 16, 32, 32)))
    set_seed(TEST_SEED)
    other = mtl_dls('folder', root=shapes_folder(tmp_path / 'other', seed=1), train_ways=3, test_ways=3, meta_batch_size=4,
                    epoch_length=120, val_episodes=1, test_episodes=1, device='cpu')
    teacher = mtl_learner(other, lr=3e-3, **kw)
    teacher.fit_one_cycle(1)
    weights = tmp_path / 'shapes.pth'
    torch.save(teacher.model.backbone.state_dict(), weights)
    folder = shapes_folder(tmp_path / 'shapes')
    res = {}
    for name, start in [('scratch', False), ('pretrained', weights)]:
        set_seed(TEST_SEED)
        dls = mtl_dls('folder', root=folder, train_ways=3, test_ways=3, meta_batch_size=4, epoch_length=24, val_episodes=1,
                      test_episodes=1, device='cpu')
        learn = mtl_learner(dls, pretrained=start, size=32, mean=other.splits.mean, std=other.splits.std, **kw)
        learn.fine_tune(1, 2e-3)   # one frozen epoch, one unfrozen: the same two epochs for both
        res[name] = learn.evaluate(ways=3, shots=5, queries=5, episodes=100, progress=False)
    pre, scratch = res['pretrained'], res['scratch']
    assert_gain('pretrained beats scratch', pre.accs, scratch.accs)


def test_summary_of_the_default_resnet12():
    # its pass counter was handed to fastai's hooks as a 0-d tensor, which they cannot iterate
    learn = mtl_learner(_dls(), arch='resnet12', arch_kwargs=dict(channels=(8, 16, 16, 32)))
    text = learn.summary()
    n = sum(p.numel() for p in learn.model.backbone.parameters())
    assert 'RampDropBlock' in text and 'PassCounter' in text and f"Total params: {n:,}" in text
    assert int(learn.model.backbone.num_batches_tracked) == 0   # summary's pass is not a training pass
