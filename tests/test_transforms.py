import pytest
import torch
import torchvision.transforms.functional as TF
from fastai.vision.core import TensorImage

from fsmtl.data.core import InputSpec
from fsmtl.data.transforms import BatchColorJitter, BatchCropFlip, lee19_padding, lee19_tfms
from fsmtl.data.block import mtl_dls
from helpers import coded_splits

OPS = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]  # BatchColorJitter's op ids 0, 1, 2


def reference(x, top, left, flip, factors, order, pad):
    "torchvision's functional ops, image by image, in Lee19's order: RandomCrop, ColorJitter, RandomHorizontalFlip."
    out = []
    for i, img in enumerate(x):
        h, w = img.shape[-2:]
        img = TF.crop(TF.pad(img, [pad] * 4, fill=0), int(top[i]), int(left[i]), h, w)
        for op in order[i].tolist(): img = OPS[op](img, float(factors[i, op]))
        out.append(TF.hflip(img) if flip[i] else img)
    return torch.stack(out)


@pytest.mark.parametrize('size', [32, 84])
def test_equals_torchvision_image_by_image(size):
    torch.manual_seed(size)
    x = (torch.rand(64, 3, size, size) * 255).round().to(torch.uint8)
    crop, jitter = BatchCropFlip(pad=lee19_padding(size)), BatchColorJitter()
    geo, col = crop.draw(len(x)), jitter.draw(len(x))
    assert geo[2].any() and not geo[2].all()
    assert len({tuple(o) for o in col[1].tolist()}) > 1  # several orders of operations in one batch
    ours = jitter.apply(crop.apply(x, *geo).float() / 255, *col)  # as the pipeline runs: uint8 crop, to float, jitter
    torch.testing.assert_close(ours, reference(x.float() / 255, *geo, *col, crop.pad), atol=1e-6, rtol=0)


def test_draws_follow_torchvision_ranges():
    torch.manual_seed(0)
    top, left, flip = BatchCropFlip(pad=4).draw(20000)
    factors, order = BatchColorJitter(0.4).draw(20000)
    assert top.min() == 0 and top.max() == 8 and left.min() == 0 and left.max() == 8
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and abs(factors.mean() - 1) < 0.01
    assert (order.sort(dim=1).values == torch.arange(3)).all()
    assert len({tuple(o) for o in order.tolist()}) == 6
    assert abs(flip.float().mean() - 0.5) < 0.02


def test_padding_by_size():
    assert lee19_padding(32) == 4 and lee19_padding(84) == 8


def test_pipeline_train_augments_and_eval_only_normalises():
    sp = coded_splits()
    dls = mtl_dls(sp, meta_batch_size=2, epoch_length=4, val_episodes=3, test_episodes=3, device='cpu')
    assert [type(t).__name__ for t in dls.train.after_batch.fs] == ['BatchCropFlip', 'IntToFloatTensor', 'BatchColorJitter', 'NormalizeInPlace']
    x, y = dls.valid.one_batch()
    raw = torch.from_numpy(sp.val.load(dls.valid.episodes[:len(x) // 100].flatten())).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(sp.mean).view(1, 3, 1, 1), torch.tensor(sp.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x.as_subclass(torch.Tensor), (raw - mean) / std)
    # training batches are augmented: not equal to the normalised raw images
    torch.manual_seed(1)
    xt, yt = dls.train.one_batch()
    assert xt.shape == (2 * 5 * 10, 3, 32, 32)
    assert not torch.allclose(xt.as_subclass(torch.Tensor)[:, :, 8:-8, 8:-8].std(), torch.tensor(0.))


def test_augment_off():
    dls = mtl_dls(coded_splits(), meta_batch_size=2, epoch_length=4, val_episodes=3, test_episodes=3,
                  augment=False, device='cpu')
    assert [type(t).__name__ for t in dls.train.after_batch.fs] == ['IntToFloatTensor', 'NormalizeInPlace']
    assert [type(t).__name__ for t in lee19_tfms(InputSpec(32, (0.5,) * 3, (0.2,) * 3), augment=False)] == ['IntToFloatTensor', 'NormalizeInPlace']


def test_batch_transform_keeps_type_and_device():
    x = TensorImage(torch.rand(4, 3, 32, 32))
    for tfm in BatchCropFlip(pad=4), BatchColorJitter():
        out = tfm(x.clone(), split_idx=0)
        assert isinstance(out, TensorImage) and out.shape == x.shape and out.device == x.device
        assert not torch.equal(out, x)
        assert torch.equal(tfm(x, split_idx=1), x)  # not applied outside training


def test_jitter_in_chunks_equals_whole_batch():
    "The transform jitters big batches a few images at a time; the result must be that of one call on the whole batch."
    x = TensorImage(torch.rand(200, 3, 84, 84))  # more than one chunk of 84-pixel images
    jitter = BatchColorJitter()
    torch.manual_seed(5)
    out = jitter(x.clone(), split_idx=0)
    torch.manual_seed(5)
    want = jitter.apply(x.clone().as_subclass(torch.Tensor), *jitter.draw(len(x)))
    torch.testing.assert_close(out.as_subclass(torch.Tensor), want, atol=1e-6, rtol=0)
