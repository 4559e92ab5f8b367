"Test-time fine-tuning against the plain probe, on the same episodes: glyphs, then a drawn folder of shapes (README numbers)."
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from fastai.torch_core import set_seed

sys.path.insert(0, str(Path(__file__).parents[1] / 'tests'))
from helpers import shapes_folder  # noqa: E402 (the drawn folder of tests/test_finetune.py)
from fsmtl.all import evaluate, get_benchmark, mtl_dls, mtl_learner  # noqa: E402,F401

ARCH = dict(arch='resnet10t', arch_kwargs=dict(channels=(16, 32, 64, 64)))


def compare(learn, data, label, **kw):
    "Print the plain probe's accuracy, each fine-tuning setting's, and their paired difference on the same episodes."
    t = time.time(); plain = learn.evaluate(data, progress=False, **kw)
    print(label, 'plain:', repr(plain).replace('\n', ' | '), f'({time.time() - t:.0f} s)', flush=True)
    for steps, lr in [(10, 1e-3), (10, 1e-2)]:
        t = time.time(); ft = learn.evaluate(data, finetune_steps=steps, finetune_lr=lr, progress=False, **kw)
        print(f'{label} finetune_steps={steps} finetune_lr={lr}:', repr(ft).replace('\n', ' | '), f'({time.time() - t:.0f} s)')
        for s in ft:
            d = ft[s].accs - plain[s].accs
            print(f'   {s}-shot, fine-tuned minus plain: {100 * d.mean():+.2f} ± {100 * 1.96 * d.std() / np.sqrt(len(d)):.2f} points',
                  flush=True)


if __name__ == '__main__':
    torch.set_num_threads(1)
    root = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
    set_seed(0)
    dls = mtl_dls('glyphs', root=root, epoch_length=240, val_episodes=10, test_episodes=10, device='cpu')
    learn = mtl_learner(dls, lr=3e-3, **ARCH)
    learn.fit_one_cycle(2)
    weights = root / 'glyphs_resnet10t.pth'
    torch.save(learn.model.backbone.state_dict(), weights)
    compare(learn, dls, 'glyphs', ways=5, shots=(1, 5), queries=15, episodes=60)
    set_seed(0)
    sd = mtl_dls('folder', root=shapes_folder(root / 'shapes'), train_ways=3, test_ways=3, meta_batch_size=4, epoch_length=24,
                 val_episodes=5, test_episodes=5, device='cpu', num_workers=0)
    shapes = mtl_learner(sd, pretrained=weights, size=32, mean=dls.splits.mean, std=dls.splits.std, **ARCH)
    shapes.fine_tune(2, 2e-3)
    compare(shapes, sd, 'shapes', ways=3, shots=(1, 5), queries=5, episodes=60)
