"The MTL model, its multi-task loss against a per-task reference, optimisers by name, schedules, mixed precision on the CPU."
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback

from fsmtl.data.block import mtl_dls
from fsmtl.heads import MTLModel, MultiTaskLoss
from fsmtl.learner import OPTIMIZERS, TORCH_OPTIMIZER, get_opt, mtl_learner, step_sched

pytestmark = pytest.mark.usefixtures('one_thread')
SMALL = dict(channels=(8, 16, 16, 32))   # a small ResNet-12 keeps CPU fits short


def task_batch(n_tasks, ways, per_class, n_base, gen):
    "Global class ids of `n_tasks` tasks, task-major and class-major, each task's classes in a random order."
    classes = torch.stack([torch.randperm(n_base, generator=gen)[:ways] for _ in range(n_tasks)])
    return classes[:, :, None].expand(-1, -1, per_class).flatten()


@pytest.mark.parametrize('n_tasks,ways,per_class', [(1, 5, 10), (6, 5, 10), (3, 2, 1), (4, 7, 3)])
def test_multitask_loss_equals_the_per_task_reference(n_tasks, ways, per_class):
    gen = torch.Generator().manual_seed(n_tasks * 100 + ways)
    n_base, dim = 20, 16
    y = task_batch(n_tasks, ways, per_class, n_base, gen)
    feats = torch.randn(len(y), dim, generator=gen, requires_grad=True)
    head = torch.randn(n_base, dim, generator=gen, requires_grad=True)
    loss = MultiTaskLoss(ways, per_class)(F.linear(feats, head), y)
    # the reference: for each task, its head rows, a linear layer and cross-entropy against labels 0..ways-1
    ref, n = 0., ways * per_class
    for t in range(n_tasks):
        yt = y[t * n:(t + 1) * n]
        classes = list(dict.fromkeys(yt.tolist()))
        local = torch.tensor([classes.index(c) for c in yt.tolist()])
        ref = ref + F.cross_entropy(F.linear(feats[t * n:(t + 1) * n], head[classes]), local)
    ref = ref / n_tasks
    torch.testing.assert_close(loss, ref)
    g = torch.autograd.grad(loss, (feats, head))
    g_ref = torch.autograd.grad(ref, (feats, head))
    for a, b in zip(g, g_ref): torch.testing.assert_close(a, b)


def test_multitask_loss_rejects_partial_tasks():
    with pytest.raises(ValueError, match='whole tasks'): MultiTaskLoss(5, 2)(torch.randn(7, 10), torch.zeros(7).long())


class Fixed(torch.nn.Module):
    def forward(self, x): return x.flatten(1)


def test_mtl_model_head_and_normalised_features():
    torch.manual_seed(0)
    n_base, dim, ways = 64, 640, 5
    m = MTLModel(Fixed(), dim, n_base, ways, original_head=True)
    assert dict(m.named_parameters()).keys() == {'head'} and m.head.shape == (n_base, dim)   # no bias
    # Kaiming-uniform with a=sqrt(5) draws from U(-1/sqrt(D), 1/sqrt(D)); the original scales it by sqrt(n_base/ways)
    bound = math.sqrt(n_base / ways) / math.sqrt(dim)
    h = m.head.detach()
    assert h.abs().max() <= bound and h.abs().max() > 0.99 * bound
    assert h.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    x = torch.randn(3, dim)
    torch.testing.assert_close(m(x), x @ h.T)
    m.norm_train_features = True
    torch.testing.assert_close(m(x), (x / x.norm(dim=1, keepdim=True)) @ h.T)


def test_default_head_starts_every_task_at_chance():
    n_base, dim, ways, per_class = 64, 32, 5, 4
    m = MTLModel(Fixed(), dim, n_base, ways)
    assert not m.head.detach().any()
    y = task_batch(3, ways, per_class, n_base, torch.Generator().manual_seed(0))
    # equal logits: each image's probability of its class is 1/ways
    assert MultiTaskLoss(ways, per_class)(m(torch.randn(len(y), dim)), y).item() == pytest.approx(math.log(ways), abs=1e-6)


@pytest.mark.slow
def test_default_head_trains_above_chance(glyph_splits):
    torch.manual_seed(0)
    dls = mtl_dls(glyph_splits, meta_batch_size=3, epoch_length=60, val_episodes=2, test_episodes=2, device='cpu')
    learn = mtl_learner(dls, arch_kwargs=SMALL, lr=1e-2)
    first = []
    learn.fit(4, cbs=[type('First', (Callback,), dict(after_loss=lambda cb: first or first.append(cb.loss.item())))()])
    assert first[0] == pytest.approx(math.log(5), abs=1e-5)
    names = learn.recorder.metric_names[1:]
    # at chance (1/5) a task's accuracy over 50 images spreads by sqrt(0.2*0.8/50) = 0.057, the mean of 60 tasks by 0.0073:
    # a 95% CI of 0.014, and the margin is more than 3 times that
    assert learn.recorder.values[-1][names.index('task_acc')] > 0.2 + 0.05


def test_optimisers_by_name():
    def steps(opt_func, wd, n=3):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 3)
        o = opt_func(list(lin.parameters()), lr=0.1)
        o.set_hypers(wd=wd) if hasattr(o, 'set_hypers') else None
        for i in range(n):
            o.zero_grad()
            lin(torch.ones(2, 4) * (i + 1)).pow(2).sum().backward()
            o.step()
        return lin.weight.detach().clone()
    def torch_steps(cls, n=3, **kw):
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 3)
        o = cls(lin.parameters(), lr=0.1, **kw)
        for i in range(n):
            o.zero_grad()
            lin(torch.ones(2, 4) * (i + 1)).pow(2).sum().backward()
            o.step()
        return lin.weight.detach().clone()
    # sgd is SGD with momentum 0.9 and L2 weight decay, as torch's; sgdw decays the weights apart from the gradient
    torch.testing.assert_close(steps(get_opt('sgd'), 0.01), torch_steps(torch.optim.SGD, momentum=0.9, weight_decay=0.01))
    assert not torch.allclose(steps(get_opt('sgdw'), 0.01), steps(get_opt('sgd'), 0.01))
    torch.testing.assert_close(steps(get_opt('adamax'), 0.), torch_steps(torch.optim.Adamax))
    # fastai's OptimWrapper around torch-optimizer's classes, with the original code's momentum for SGDP
    torch_optimizer = pytest.importorskip('torch_optimizer')
    torch.testing.assert_close(steps(get_opt('sgdp'), 0.), torch_steps(torch_optimizer.SGDP, momentum=0.9))
    torch.testing.assert_close(steps(get_opt('adamp'), 0.), torch_steps(torch_optimizer.AdamP))
    for name in [*OPTIMIZERS, *TORCH_OPTIMIZER]:
        w = steps(get_opt(name), 0.)
        assert torch.isfinite(w).all() and not torch.allclose(w, steps(get_opt(name), 0., n=0)), name
    assert get_opt('RAdam') is get_opt('radam')
    with pytest.raises(ValueError, match='sgd, sgdw'): get_opt('lamb')


def test_torch_optimizer_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch_optimizer', None)
    with pytest.raises(ImportError, match='pip install torch-optimizer'): get_opt('adamp')


def test_step_schedule_by_hand():
    f = step_sched(1.0, every=2, rate=0.1, n_epoch=6)
    # fractions of training done at the start of epochs 0..5, and just before the end
    assert [f(e / 6) for e in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert f(0.999) == pytest.approx(0.01)


class Spy(Callback):
    "Records the dtype of the backbone's first convolution output and the autocast state, in training and in validation."
    order = 100
    def before_fit(self):
        self.seen = []
        conv = next(m for m in self.learn.model.modules() if isinstance(m, torch.nn.Conv2d))
        self.h = conv.register_forward_hook(lambda m, i, o: self.seen.append(
            (self.training, o.dtype, o.is_contiguous(memory_format=torch.channels_last), m.weight.is_contiguous())))
    def after_fit(self): self.h.remove()


@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_mixed_precision_and_channels_last_on_the_cpu(glyph_splits, precision):
    dls = mtl_dls(glyph_splits, meta_batch_size=2, epoch_length=4, val_episodes=4, test_episodes=4, device='cpu')
    spy = Spy()
    learn = mtl_learner(dls, arch_kwargs=SMALL, precision=precision, channels_last=True, cbs=[spy])
    learn.fit(1, 1e-3)
    low = torch.bfloat16 if precision == 'bf16' else torch.float16
    train = [s for s in spy.seen if s[0]]
    valid = [s for s in spy.seen if not s[0]]
    assert train and valid
    assert all(dtype == low for _, dtype, _, _ in train)            # training batches run under autocast
    assert all(dtype == torch.float32 for _, dtype, _, _ in valid)  # the probes get fp32 features
    assert all(cl and not contiguous for _, _, cl, contiguous in spy.seen)   # channels-last weights and activations
    assert not torch.is_autocast_enabled('cpu')                   # no autocast context left open
    assert learn.scaler.is_enabled() == (precision == 'fp16') if learn.scaler is not None else True
    assert math.isfinite(learn.recorder.values[-1][0])
    with pytest.raises(ValueError, match='fp32, fp16 or bf16'): mtl_learner(dls, arch_kwargs=SMALL, precision='fp8')


def test_task_accuracy_by_hand(glyph_splits):
    dls = mtl_dls(glyph_splits, meta_batch_size=3, epoch_length=9, val_episodes=2, test_episodes=2, device='cpu')

    class Keep(Callback):
        def before_fit(self): self.kept = []
        def after_loss(self):
            if self.training: self.kept.append((self.pred.detach().clone(), self.yb[0].clone()))
    keep = Keep()
    learn = mtl_learner(dls, arch_kwargs=SMALL, cbs=[keep])
    learn.fit(1, 1e-3)
    correct = total = 0
    for pred, y in keep.kept:
        for t in range(len(y) // 50):   # tasks of 5 ways x 10 images, by hand
            yt, pt = y[t * 50:(t + 1) * 50].tolist(), pred[t * 50:(t + 1) * 50].numpy()
            classes = list(dict.fromkeys(yt))
            correct += sum(int(np.argmax(pt[i, classes]) == classes.index(c)) for i, c in enumerate(yt))
            total += len(yt)
    names = learn.recorder.metric_names[1:]
    assert total == 9 * 50
    assert learn.recorder.values[-1][names.index('task_acc')] == pytest.approx(correct / total)
    h = learn.recorder.history()   # the same value through the DataFrame, and the plot of episodic accuracy
    assert len(h) == 1 and h['task_acc'].iloc[0] == pytest.approx(correct / total)
    ax = learn.recorder.plot_episodic()
    x, y = ax.lines[0].get_data()
    assert list(x) == [1] and y[0] == pytest.approx(100 * learn.recorder.values[0][names.index('episodic_acc')])
    lo, hi = ax.containers[0].lines[2][0].get_segments()[0][:, 1]   # the error bar: mean ± ci
    assert hi - lo == pytest.approx(200 * learn.recorder.values[0][names.index('episodic_ci')])
