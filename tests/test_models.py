import copy

import learn2learn as l2l
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import fsmtl.models  # noqa: F401 (registers 'resnet12' with timm)
from fsmtl.classifier import FewShotClassifier
from fsmtl.models import ResNet12, create_backbone, dropblock_gamma_scale

pytestmark = pytest.mark.usefixtures('one_thread')

SMALL = (4, 8, 8, 16)


def small(seed=0, **kw):
    "A narrow ResNet-12 with seeded weights and BatchNorm statistics that are not the identity."
    torch.manual_seed(seed)
    m = ResNet12(num_classes=0, channels=SMALL, **kw)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5), mod.bias.data.normal_(0, 0.2)
            mod.running_mean.normal_(0, 0.2), mod.running_var.uniform_(0.5, 2)
    return m


def reference_maps(sd, x):
    "The four stage maps of ResNet-12 in torch.nn.functional, eval mode, from the weights `sd`."
    def conv_bn(h, conv, bn, pad):
        h = F.conv2d(h, sd[f'{conv}.weight'], padding=pad)
        return F.batch_norm(h, sd[f'{bn}.running_mean'], sd[f'{bn}.running_var'], sd[f'{bn}.weight'], sd[f'{bn}.bias'])
    maps = []
    for i in range(1, 5):
        p = f'layer{i}.0.'
        out = F.leaky_relu(conv_bn(x, p + 'conv1', p + 'bn1', 1), 0.1)
        out = F.leaky_relu(conv_bn(out, p + 'conv2', p + 'bn2', 1), 0.1)
        out = conv_bn(out, p + 'conv3', p + 'bn3', 1) + conv_bn(x, p + 'downsample.0', p + 'downsample.1', 0)
        x = F.max_pool2d(F.leaky_relu(out, 0.1), 2)
        maps.append(x)
    return maps


def reference(sd, x):
    "ResNet-12's pooled features, from `reference_maps`."
    return F.adaptive_avg_pool2d(reference_maps(sd, x)[-1], 1).flatten(1)


def hand_set_pass(m, x, count, rate, ramp):
    "A training pass of `m`'s blocks with timm's plain `DropBlock2d`, set by hand as RFS sets its DropBlock."
    size, p = x.shape[-1], rate * min(1., count / ramp)     # square images; the ramp
    block = 5 if size >= 64 else 2                          # RFS's block size for the image size
    for i, stage in enumerate((m.layer1, m.layer2, m.layer3, m.layer4)):
        x = stage[0](x)
        if i < 2: x = F.dropout(x, rate, training=True)
        else:
            side = size // 2 ** (i + 1)   # the map of stage i
            scale = dropblock_gamma_scale(side, side, block)
            x = timm.layers.DropBlock2d(p, block, gamma_scale=scale, couple_channels=False)(x)
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


@pytest.fixture(scope='module')
def full():
    torch.manual_seed(0)
    return timm.create_model('resnet12', num_classes=0).eval()


def test_timm_conventions(full):
    assert full.num_features == 640 and isinstance(full.get_classifier(), nn.Identity)
    with torch.no_grad():
        assert full(torch.randn(2, 3, 84, 84)).shape == (2, 640)
        assert full(torch.randn(2, 3, 32, 32)).shape == (2, 640)
        assert full.forward_features(torch.randn(2, 3, 84, 84)).shape == (2, 640, 5, 5)
    m = small()
    m.reset_classifier(7)
    head = m.get_classifier()
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (16, 7)
    assert m.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert timm.create_model('resnet12', channels=SMALL, drop_rate=0.2, dropblock_size=3).dropblock_size == 3
    cfg = full.pretrained_cfg
    assert not cfg.get('url') and not cfg.get('hf_hub_id') and cfg['input_size'] == (3, 84, 84)
    torch.testing.assert_close(torch.tensor(cfg['mean']) * 255, torch.tensor([120.39586422, 115.59361427, 104.54012653]))


def test_matches_learn2learn(full, tmp_path):
    torch.manual_seed(1)
    theirs = l2l.vision.models.ResNet12(output_size=5)   # .features is ResNet12Backbone; the file has their head too
    ref = theirs.features
    assert sum(p.numel() for p in full.parameters()) == sum(p.numel() for p in ref.parameters()) == 12_424_320
    ours_sd = full.state_dict()
    assert {k: v.shape for k, v in ref.state_dict().items()} == \
        {k: v.shape for k, v in ours_sd.items() if k != 'num_batches_tracked'}
    for mod in ref.modules():
        if isinstance(mod, nn.BatchNorm2d): mod.running_mean.normal_(0, 0.1), mod.running_var.uniform_(0.5, 2)
    torch.save(theirs.state_dict(), tmp_path / 'l2l.pth')
    ours = timm.create_model('resnet12', num_classes=0, pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(tmp_path / 'l2l.pth'))).eval()
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad(): torch.testing.assert_close(ours(x), ref.eval()(x))
    # their DropBlock rate divides by (map - block + 1)**2 = 0 on the 4x4 map of stage 3, in eval mode too
    with pytest.raises(ZeroDivisionError), torch.no_grad(): ref(torch.randn(2, 3, 32, 32))


def test_same_as_functional_reference():
    m = small().eval()
    x = torch.randn(3, 3, 40, 40)
    torch.testing.assert_close(m(x), reference(m.state_dict(), x))


def test_eval_is_deterministic_and_does_not_count():
    m = small()
    m.num_batches_tracked.fill_(10 ** 6)
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m(x), m(x)) and m.num_batches_tracked.item() == 10 ** 6


def test_counter_counts_training_passes_and_is_saved():
    m, x = small(), torch.randn(2, 3, 32, 32)
    for _ in range(3): m(x)
    m.eval()(x)
    assert m.num_batches_tracked.item() == 3 and m.state_dict()['num_batches_tracked'].item() == 3
    fresh = small(seed=1)
    fresh.load_state_dict(m.state_dict())
    assert fresh.num_batches_tracked.item() == 3


def test_ramp():
    m = small(drop_rate=0.2, dropblock_ramp=100)
    for count, want in ((0, 0.), (50, 0.1), (75, 0.15), (100, 0.2), (1000, 0.2)):
        m.num_batches_tracked.fill_(count)
        assert m.drop_prob == pytest.approx(want)
    assert small(drop_rate=0.2, dropblock_ramp=0).drop_prob == pytest.approx(0.2)


def io_of(modules):
    "Forward hooks that keep the inputs and outputs of `modules`."
    seen = []
    handles = [mod.register_forward_hook(lambda mod, i, o: seen.append((i[0].detach(), o.detach()))) for mod in modules]
    return seen, handles


def test_dropblock_off_at_start_of_ramp():
    m = small(drop_rate=0.5)
    seen, _ = io_of([m.layer3[1], m.layer4[1]])
    m(torch.randn(4, 3, 84, 84))
    assert len(seen) == 2 and all(torch.equal(i, o) for i, o in seen)


def test_dropblock_drops_about_drop_rate_at_end_of_ramp():
    torch.manual_seed(0)
    m = ResNet12(num_classes=0, channels=(4, 8, 16, 32), drop_rate=0.1)
    m.num_batches_tracked.fill_(m.dropblock_ramp)
    seen, _ = io_of([m.layer3[1], m.layer4[1]])
    m(torch.randn(32, 3, 84, 84))
    for (i, o), shape in zip(seen, [(32, 16, 10, 10), (32, 32, 5, 5)]):
        assert o.shape == shape
        dropped = ((o == 0) & (i != 0)).float().mean().item()
        assert 0.06 < dropped < 0.13, (shape, dropped)


def test_gamma_scale_by_hand():
    # (block x valid seeds per axis / (seed, pixel) pairs per axis)**2, the pairs counted by hand
    assert dropblock_gamma_scale(5, 5, 5) == pytest.approx((5 * 1 / (3 + 4 + 5 + 4 + 3)) ** 2)
    assert dropblock_gamma_scale(10, 10, 5) == pytest.approx((5 * 6 / (8 + 9 + 10 + 9 + 8)) ** 2)
    assert dropblock_gamma_scale(2, 2, 2) == pytest.approx((2 * 1 / (2 + 1)) ** 2)
    # blocks clipped to the map: 4 rows, each covered by the seeds one row before to two after it
    assert dropblock_gamma_scale(4, 2, 5) == pytest.approx((4 * 1 / (3 + 4 + 3 + 2)) * (2 * 1 / (2 + 1)))


@pytest.mark.parametrize('h,w,block', [(10, 10, 5), (5, 5, 5), (4, 4, 5), (10, 5, 5), (4, 4, 2), (2, 2, 2)])
def test_scaled_timm_dropblock_drops_drop_prob(h, w, block):
    torch.manual_seed(0)
    x = torch.ones(64, 64, h, w)
    scaled = timm.layers.DropBlock2d(0.1, block, gamma_scale=dropblock_gamma_scale(h, w, block), couple_channels=False)
    assert abs((scaled(x) == 0).float().mean().item() - 0.1) < 0.015
    if (h, w) == (5, 5):   # unscaled, timm drops most of a map the size of the block
        assert (timm.layers.DropBlock2d(0.1, block, couple_channels=False)(x) == 0).float().mean() > 0.5


@pytest.mark.parametrize('size,dropblock_size,want', [(84, None, 5), (32, None, 2), (84, 3, 3), (32, 3, 3)])
def test_block_size(size, dropblock_size, want):
    m = small(dropblock_size=dropblock_size)
    m(torch.randn(2, 3, size, size))
    assert m.layer3[1].block_size == m.layer4[1].block_size == want


def test_create_backbone():
    m, n = create_backbone('resnet12')
    assert n == m.num_features == 640 and m.num_classes == 0 and m.fsmtl_arch == {'arch': 'resnet12', 'kwargs': {}}
    m, n = create_backbone('resnet10t', channels=(8, 16, 24, 32), in_chans=1)
    assert n == 32 and m.conv1[0].in_channels == 1
    assert m.fsmtl_arch == {'arch': 'resnet10t', 'kwargs': {'channels': (8, 16, 24, 32), 'in_chans': 1}}


def test_unknown_arch():
    with pytest.raises(ValueError, match="'resnt12'") as e: create_backbone('resnt12')
    assert 'resnet12' in str(e.value) and "timm.list_models('*" in str(e.value)


@pytest.mark.parametrize('name', ['w.pth', 'w.safetensors'])
def test_pretrained_file(tmp_path, name):
    src = small(seed=3)
    src.num_batches_tracked.fill_(123)
    path = tmp_path / name
    if name.endswith('.safetensors'):
        st = pytest.importorskip('safetensors.torch')
        st.save_file(src.state_dict(), path)
    else: torch.save(src.state_dict(), path)
    m, _ = create_backbone('resnet12', pretrained=path, channels=SMALL)
    want, got = src.state_dict(), m.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert small(seed=4).state_dict()['layer1.0.conv1.weight'].ne(got['layer1.0.conv1.weight']).any()


def test_pretrained_file_of_other_weights_fails(tmp_path):
    sd = small().state_dict()
    del sd['layer4.0.conv3.weight']
    torch.save(sd, tmp_path / 'w.pth')
    with pytest.raises(ValueError, match='layer4.0.conv3.weight'):
        create_backbone('resnet12', pretrained=tmp_path / 'w.pth', channels=SMALL)


def test_missing_pretrained_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        create_backbone('resnet12', pretrained=str(tmp_path / 'nowhere.pth'))


@pytest.mark.timeout(60)
@pytest.mark.parametrize('arch', ['resnet18', 'resnet12'])
def test_pretrained_offline(monkeypatch, tmp_path, arch):
    import huggingface_hub.constants as hf
    # the hub reads these when imported: patch the values too, so that nothing goes to the network or to a cache
    for var in ('HF_HUB_OFFLINE', 'TRANSFORMERS_OFFLINE'): monkeypatch.setenv(var, '1')
    monkeypatch.setenv('HF_HOME', str(tmp_path))
    monkeypatch.setattr(hf, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hf, 'HF_HUB_CACHE', str(tmp_path / 'hub'))
    with pytest.raises(RuntimeError, match='pretrained=') as e: create_backbone(arch, pretrained=True)
    assert arch in str(e.value) and e.value.__cause__ is not None


def test_classifier_round_trip(tmp_path):
    torch.manual_seed(0)
    backbone, _ = create_backbone('resnet12', channels=SMALL)
    clf = FewShotClassifier(backbone, size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    clf.save(tmp_path / 'clf.pth')
    back = FewShotClassifier.load(tmp_path / 'clf.pth')
    images = torch.rand(5, 3, 32, 32)
    assert isinstance(back.backbone, ResNet12) and back.arch_kwargs == {'channels': SMALL}
    torch.testing.assert_close(back.features(images), clf.features(images), rtol=0, atol=0)


def test_state_dict_names_are_learn2learns():
    "Old checkpoints still load: learn2learn's names and shapes, the ramp's counter and timm's `fc`."
    torch.manual_seed(0)
    theirs = l2l.vision.models.ResNet12(output_size=5).state_dict()
    want = {k.removeprefix('features.').replace('classifier.', 'fc.'): v.shape for k, v in theirs.items()}
    ours = timm.create_model('resnet12', num_classes=5).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {**want, 'num_batches_tracked': torch.Size([])}


@pytest.mark.parametrize('size,checkpointing', [(40, False), (84, False), (84, True)])
def test_training_passes_match_timm_dropblock_set_by_hand(size, checkpointing):
    m = small(drop_rate=0.3, dropblock_ramp=3)
    ref = copy.deepcopy(m)
    m.set_grad_checkpointing(checkpointing)
    x = torch.randn(4, 3, size, size)
    for count in range(5):   # along the ramp of 3 passes, then past it
        torch.manual_seed(count)
        got = m(x)
        torch.manual_seed(count)
        want = hand_set_pass(ref, x, count, 0.3, 3)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        got.square().sum().backward(), want.square().sum().backward()
    assert m.num_batches_tracked.item() == 5
    for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize('coarse', [True, False])
def test_group_matcher_gives_stages_then_head(coarse):
    m = small()
    m.reset_classifier(5)
    matcher = m.group_matcher(coarse=coarse)
    groups = timm.models.group_parameters(m, matcher)
    names = [n for n, _ in m.named_parameters()]
    want = [[n for n in names if n.startswith(pre)] for pre in ('layer1.', 'layer2.', 'layer3.', 'layer4.', 'fc.')]
    assert list(matcher) == ['stem', 'blocks'] and [sorted(g) for g in groups.values()] == [sorted(w) for w in want]


def test_intermediates_and_features_only_match_reference():
    m = small().eval()
    x = torch.randn(2, 3, 40, 40)
    maps = reference_maps(m.state_dict(), x)
    with torch.no_grad():
        final, inter = m.forward_intermediates(x)
        torch.testing.assert_close(final, maps[-1])
        for got, want in zip(inter, maps, strict=True): torch.testing.assert_close(got, want)
        for indices, want in (([1, 3], [1, 3]), (2, [2, 3]), ([-4], [0])):
            got = m.forward_intermediates(x, indices=indices, intermediates_only=True, stop_early=True)
            assert len(got) == len(want) and all(torch.allclose(g, maps[i]) for g, i in zip(got, want))
    feats = timm.create_model('resnet12', features_only=True, channels=SMALL, out_indices=(1, 2)).eval()
    assert feats.feature_info.channels() == [8, 8] and feats.feature_info.reduction() == [4, 8]
    # the stages after the last index and the head are pruned: their weights are no longer there
    loaded = feats.model.load_state_dict(m.state_dict(), strict=False)
    assert not loaded.missing_keys and loaded.unexpected_keys
    assert all(k.startswith('layer4.0.') for k in loaded.unexpected_keys)
    with torch.no_grad(): got = feats(x)
    torch.testing.assert_close(got, maps[1:3])


def test_torchscript_matches_reference_and_ramp():
    m = small(drop_rate=0.3, dropblock_ramp=3)
    scripted, ref = torch.jit.script(copy.deepcopy(m)), copy.deepcopy(m)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad(): torch.testing.assert_close(scripted.eval()(x), reference(m.state_dict(), x))
    scripted.train()
    for count in range(4):
        torch.manual_seed(count)
        got = scripted(x)
        torch.manual_seed(count)
        torch.testing.assert_close(got, hand_set_pass(ref, x, count, 0.3, 3), rtol=0, atol=0)
    assert scripted.num_batches_tracked.item() == 4


def test_fx_graph_counts_training_passes():
    from torchvision.models.feature_extraction import create_feature_extractor
    m = small(drop_rate=0.3, dropblock_ramp=3).train()
    # timm's leaves: the DropBlocks, whose rate and block size are Python numbers, and the pass counter
    leaves = dict(leaf_modules=timm.models.get_notrace_modules(),
                  autowrap_functions=timm.models.get_notrace_functions())
    fx = create_feature_extractor(m, return_nodes={'layer3.1': 'map3'}, tracer_kwargs=leaves)
    assert m.num_batches_tracked.item() == 0   # tracing is not a pass
    x = torch.randn(2, 3, 40, 40)
    for _ in range(2): fx(x)
    assert m.num_batches_tracked.item() == 2
