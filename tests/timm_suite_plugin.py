"pytest plugin for timm's tests/test_models.py: registers 'resnet12' and adds it to timm's feature tests."
import functools

import pytest

import fsmtl.models  # noqa: F401 (registers 'resnet12' with timm before timm's test module lists the models)

# timm parametrizes these over the models of its own modules only (its FEAT_INTER_FILTERS), so an outside model
# that has `forward_intermediates` and `prune_intermediate_layers` is added to them here, under timm's test ids
FEATURE_TESTS = ('test_model_forward_intermediates', 'test_model_forward_intermediates_features')


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(collector, name, obj):
    "timm's items, and for each test of `FEATURE_TESTS` one more, on 'resnet12' with a batch of 1."
    items = yield
    if name not in FEATURE_TESTS or collector.name != 'test_models.py': return items
    test = functools.partial(obj, 'resnet12', 1)   # (model_name, batch_size)
    ours = pytest.Function.from_parent(collector, name=f'{name}[1-resnet12]', callobj=test)
    return [*(items or []), ours]
