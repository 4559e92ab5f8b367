"""A process of a torchrun launch in tests/test_distributed.py: `torchrun --nproc_per_node 2 tests/ddp_worker.py MODE OUT ROOT`.

parts: the episodic accuracy of fixed weights, then one training step of an MTL learner under `distrib_ctx`, then an
epoch frozen and one not, each process writing what it saw to OUT/rank{r}.pt, and, as it exits, whether it had
left its process group to OUT/left{r}. fail: `fsmtl train` on glyphs in ROOT, rank 1 failing to load a task.
"""
import atexit
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.torch_core import set_seed

from fsmtl.algorithms import get_algorithm
from fsmtl.data.block import mtl_dls
from fsmtl.data.glyphs import SMALL_IMAGES, glyphs
from fsmtl.distributed import init_distributed, rank, rank_seed
from fsmtl.evaluate import evaluate
from fsmtl.learner import mtl_learner
from fsmtl.models import create_backbone
from fsmtl.pretrained import FrozenEpochs
from fsmtl.runlog import quiet

CHANNELS = (8, 16, 16, 32)
STEP = dict(train_ways=5, train_shots=2, train_queries=2, meta_batch_size=4, epoch_length=4, test_ways=5, test_shots=1,
            test_queries=2, val_episodes=6, test_episodes=1)
EVAL = dict(split='val', ways=5, shots=(1, 5), queries=5, episodes=11, seed=3)
# test-time fine-tuning, sharded too: one episode per batch (chunk), so the two ranks take 3 and 2 of the 5
TUNED = dict(EVAL, episodes=5, finetune_steps=2, finetune_lr=0.05, chunk=50)
# a meta-learner's own head, sharded too: two episodes a batch (chunk), so the two ranks take 6 and 5 of the 11
NATIVE = dict(EVAL, probe='native', chunk=100)
NATIVE_ALGORITHMS = ('protonet', 'maml')
LR = 0.1


class Batches(Callback):
    "Keep the training batches as the model sees them."
    def before_fit(self): self.seen = []
    def before_batch(self):
        if self.training: self.seen.append((self.xb[0].as_subclass(torch.Tensor).clone(), self.yb[0].as_subclass(torch.Tensor).clone()))


def parts(out, root):
    # atexit runs last in, first out: this runs after the handler init_distributed registers, as the interpreter ends
    atexit.register(lambda: Path(f'{out}/left{rank()}').write_text(str(not dist.is_initialized())))
    init_distributed()
    splits = glyphs(root, n_images=SMALL_IMAGES, progress=False)
    torch.manual_seed(0)
    backbone, _ = create_backbone('resnet12', channels=CHANNELS)
    accs = {s: r.accs for s, r in evaluate(backbone, splits, progress=False, **EVAL).items()}
    import fsmtl.adapt
    copies, copy = [], fsmtl.adapt.finetune_copy
    fsmtl.adapt.finetune_copy = lambda *a, **k: (copies.append(1), copy(*a, **k))[1]
    tuned = {s: r.accs for s, r in evaluate(backbone, splits, progress=False, **TUNED).items()}
    tuned['copies'] = len(copies)
    fsmtl.adapt.finetune_copy = copy
    native = {}
    for algorithm in NATIVE_ALGORITHMS:
        model, episodes = native_model(algorithm, backbone), []
        predict = model.predict_episodes
        model.predict_episodes = lambda x, *a, **k: (episodes.append(len(x) // (5 * 10)), predict(x, *a, **k))[1]
        native[algorithm] = {s: r.accs for s, r in evaluate(model, splits, progress=False, **NATIVE).items()}
        native[algorithm]['episodes'] = sum(episodes)
    dls = mtl_dls(splits, augment=False, device='cpu', **STEP)
    set_seed(0)
    # the original code's random head: from a zero head the first step leaves the backbone as it is
    learn = quiet(mtl_learner(dls, arch_kwargs=dict(channels=CHANNELS, drop_rate=0.), opt='sgd', lr=LR, cbs=[Batches()],
                              original_head=True))
    init = {k: v.clone() for k, v in learn.model.state_dict().items()}
    set_seed(rank_seed(0, rank()))   # each process draws its own tasks, as `train` does
    with learn.distrib_ctx(sync_bn=False): learn.fit(1)
    seen = dict(accs=accs, tuned=tuned, native=native, init=init, batches=learn.batches.seen, final={k: v.clone() for k, v in learn.model.state_dict().items()},
                history=learn.recorder.history().to_dict('list'))
    # an epoch with the backbone frozen (no gradients for DDP to wait for), then one with all of it
    with learn.distrib_ctx(sync_bn=False): learn.fit(2, cbs=[FrozenEpochs(1)])
    torch.save(dict(seen, thawed=learn.model.state_dict()), f'{out}/rank{rank()}.pt')


def native_model(algorithm, backbone):
    "The model of `algorithm` around `backbone`, its own weights seeded alike on every process."
    torch.manual_seed(1)
    return get_algorithm(algorithm, adaptation_lr=0.1, first_order=True).model(backbone, CHANNELS[-1], 64, 5, 2, 3)


def fail(out, root):
    import fsmtl.data.tasks
    from fsmtl.cli import main
    if rank() == 1:
        def unreadable(self, s): raise OSError(f"rank {rank()} cannot read the images of its task")
        fsmtl.data.tasks.TaskDL.create_item = unreadable
    return main(['train', '--dataset', 'glyphs-small', '--root', root, '--log_dir', f'{out}/runs', '--model_kwargs', '{"channels": [8, 16, 16, 32]}',
                 '--meta_batch_size', '2', '--epoch_length', '8', '--val_epoch_length', '2', '--final_test_epoch_length', '2',
                 '--max_epochs', '1'])


if __name__ == '__main__':
    torch.set_num_threads(1)
    mode, out, root = sys.argv[1:4]
    sys.exit(parts(out, root) if mode == 'parts' else fail(out, root))
