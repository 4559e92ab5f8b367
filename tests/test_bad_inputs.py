"Bad inputs a user brings: weights files, model_kwargs, a fastai export, fp16 on a CPU, labels, progress bars in logs."

import numpy as np
import pytest
import timm
import torch
from fastai.learner import load_learner
from PIL import Image

from fsmtl.algorithms import get_algorithm
from fsmtl.classifier import FewShotClassifier
from fsmtl.cli import main
from fsmtl.evaluate import evaluate
from fsmtl.learner import mtl_learner
from fsmtl.models import create_backbone
from helpers import coded_splits
from test_faults import TINY, flags
from test_run_folder import shell

pytestmark = pytest.mark.usefixtures('one_thread')
ARCH = dict(channels=(8, 16, 16, 32))


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory):
    "A text file, an empty file, random bytes and an fsmtl checkpoint, each given where weights are expected."
    d = tmp_path_factory.mktemp('bad-weights')
    (d / 'notes.txt').write_text('these are not weights\n')
    (d / 'empty.pth').write_bytes(b'')
    # seeded: os.urandom's bytes start as torch's old pickles do (0x80) once in 256 runs, and are then read as one
    (d / 'noise.pth').write_bytes(np.random.default_rng(0).bytes(4096))
    backbone, _ = create_backbone('resnet12', **ARCH)
    torch.save(dict(arch='resnet12', arch_kwargs=ARCH, size=32, mean=[.5] * 3, std=[.5] * 3,
                    backbone=backbone.state_dict()), d / 'best.pth')
    return d


@pytest.mark.slow
def test_a_text_file_as_pretrained_from_the_shell(bad_files, glyph_root, tmp_path):
    # KeyError: 101 from resnet12.py
    rc, out = shell('train', *flags(**TINY | dict(root=glyph_root, log_dir=tmp_path, pretrained=bad_files / 'notes.txt')))
    assert rc == 2 and 'Traceback' not in out, out[-3000:]
    assert f"fsmtl train: Cannot read weights file {bad_files / 'notes.txt'}: it is not a file torch.save wrote" in out
    assert 'pretrained= (--pretrained) takes a weights file' in out


@pytest.mark.parametrize('name,message', [
    ('empty.pth', 'the file is empty (0 bytes); pretrained= (--pretrained) takes a weights file'),
    ('noise.pth', 'it is not a file torch.save wrote'),
    ('best.pth', 'is an fsmtl checkpoint, not a weights file: test it with fsmtl test --load_path')])
def test_bad_pretrained_files_are_named(bad_files, glyph_root, tmp_path, capsys, name, message):
    # EOFError for an empty file; "not the weights of a ResNet-12" for fsmtl's own best.pth; torch's "retry with
    # weights_only=False", which no option offers, for random bytes
    opts = TINY | dict(root=glyph_root, log_dir=tmp_path, pretrained=bad_files / name)
    assert main(['train', *flags(**opts)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('kwargs,message', [
    ('{"foo": 1}', "resnet12 cannot be built with the keyword arguments {'foo': 1} (model_kwargs, arch_kwargs)"),
    ('[1, 2]', 'model_kwargs must be keyword arguments of the architecture, a dict'),
    ('{"channels": [0, 16, 16, 32]}', 'channels must give the widths of 4 stages, positive whole numbers, got (0, 16, 16, 32)')])
def test_bad_model_kwargs_are_named(glyph_root, tmp_path, capsys, kwargs, message):
    # TypeErrors, and for a zero width a failure in torch after setup
    opts = {k: v for k, v in TINY.items() if k != 'model_kwargs'} | dict(root=glyph_root, log_dir=tmp_path)
    args = ['train', *flags(**opts), '--model_kwargs', kwargs]
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_a_fastai_export_says_how_to_make_a_classifier(tmp_path, capsys):
    # torch's text, with raw ANSI codes
    learn = mtl_learner(mtl_dls_small(), arch='resnet12', arch_kwargs=ARCH, path=tmp_path)
    learn.export('export.pkl')
    assert load_learner(tmp_path / 'export.pkl') is not None   # a good export
    for d in ('support/a', 'support/b', 'query'): (tmp_path / d).mkdir(parents=True)
    for i, d in enumerate(('support/a', 'support/b', 'query')):
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(tmp_path / d / 'x.png')
    export = str(tmp_path / 'export.pkl')
    for args in (['test', '--load_path', export], ['predict', '--checkpoint', export, '--support', str(tmp_path / 'support'),
                                                   '--query', str(tmp_path / 'query')]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert 'is a fastai Learner saved by learn.export()' in err and 'FewShotClassifier.from_learner(load_learner(path))' in err
        assert '\x1b' not in err and len(err.splitlines()) == 1


def mtl_dls_small():
    from fsmtl.data.block import mtl_dls
    return mtl_dls(coded_splits(n_train=6, n_val=5, n_test=5, per_class=10), train_ways=3, train_shots=2, train_queries=2,
                   meta_batch_size=2, epoch_length=2, test_ways=3, test_shots=2, test_queries=2, val_episodes=2,
                   test_episodes=2, device='cpu')


def test_fp16_on_a_cpu_warns_and_suggests_bf16():
    # 20-25 times slower an epoch than fp32, silently
    learn = mtl_learner(mtl_dls_small(), arch='resnet12', arch_kwargs=ARCH, precision='fp16')
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ in ('ProgressCallback', 'EpochTable')])
    with pytest.warns(UserWarning, match=r'fp16 on the CPU is many times slower .* bf16 \(--bf16\)'): learn.fit(1)


def test_the_native_test_draws_no_bar_into_a_pipe(glyph_splits, capfd):
    # 58 carriage returns for 200 episodes in a piped log
    backbone, nf = create_backbone('resnet12', **ARCH)
    model = get_algorithm('protonet').model(backbone, nf, 64, 5, 1, 1)
    evaluate(model, glyph_splits, shots=1, queries=2, episodes=6, probe='native', progress=True)
    out, err = capfd.readouterr()
    assert '\r' not in out + err and '█' not in out + err


def test_labels_true_and_1_are_not_one_class():
    # `True` joined the class of `1` in silence
    torch.manual_seed(0)
    backbone = timm.create_model('resnet10t', num_classes=0, channels=(8, 8, 16, 16)).eval()
    clf = FewShotClassifier(backbone, 32, (.5,) * 3, (.25,) * 3)
    ims = [np.full((32, 32, 3), v, np.uint8) for v in (0, 80, 160)]
    with pytest.raises(ValueError, match="labels True and 1 are one value in Python, so their images would be one class"):
        clf.fit(ims, [1, '1', True])
    assert len(clf.fit(ims, ['1', '2', 'True']).classes) == 3
