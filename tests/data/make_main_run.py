"""A run checkpoint written by main's code (ec4c93d), what main's FewShotClassifier makes of four images with it, and
main's `evaluate_checkpoint` of it: tests/test_classifier.py checks that today's code reads it back the same.
Made by `PYTHONPATH=<main at ec4c93d> python tests/data/make_main_run.py tests/data <data root with glyphs-small>`."""
import sys, tempfile
from pathlib import Path
import numpy as np, torch, timm
import fsmtl
from fsmtl.train import evaluate_checkpoint, train
from fsmtl.classifier import FewShotClassifier
print('fsmtl from', fsmtl.__file__)
out = Path(sys.argv[1])
ARCH = dict(channels=(8, 8, 16, 16))
tmp = Path(tempfile.mkdtemp())
torch.manual_seed(1)
m = timm.create_model('resnet10t', num_classes=0, **ARCH)
torch.save(m.state_dict(), tmp / 'w.pth')
# pretrained with a side of 36 on 32-px glyphs: images loaded at 32, resized to 36 by the model's bicubic filter
train(dataset='glyphs-small', root='/tmp/fsmtl-data', log_dir=str(tmp), run_name='main', model='resnet10t', model_kwargs=ARCH,
      pretrained=str(tmp / 'w.pth'), size=36, meta_batch_size=1, epoch_length=1, val_epoch_length=2,
      final_test_epoch_length=2, test_queries=2, max_epochs=1, scheduler='one_cycle', progress=False, no_log=True, seed=0)
st = torch.load(tmp / 'main' / 'best.pth', weights_only=True)
st.pop('opt', None)
torch.save(st, out / 'main_run_best.pth')
images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
clf = FewShotClassifier.from_checkpoint(out / 'main_run_best.pth')
print({k: st[k] for k in ('size', 'image_size', 'mean', 'std', 'interpolation')})
r = evaluate_checkpoint(out / 'main_run_best.pth', root=sys.argv[2], final_test_epoch_length=6, test_queries=2, progress=False)
torch.save(dict(images=images, features=clf.features([im.numpy() for im in images]),
                test={s: torch.from_numpy(v.accs) for s, v in r.items()}), out / 'main_run_features.pt')
print({s: v.accs.tolist() for s, v in r.items()})
