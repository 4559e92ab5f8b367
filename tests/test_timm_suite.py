"timm's own model tests (tests/test_models.py of its source package, fetched by `make`) on 'resnet12'."
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / '.cache' / f'timm-{timm.__version__}' / 'tests' / 'test_models.py'

# every test of timm's file that takes a model name; the last two are timm's feature tests, which it runs on its own
# modules' models only and timm_suite_plugin.py adds 'resnet12' to. The pretrained tests need the hub, none exists
WANT = {'test_model_forward[1-resnet12]', 'test_model_backward[2-resnet12]', 'test_model_default_cfgs[1-resnet12]',
        'test_model_forward_torchscript[1-resnet12]', 'test_model_forward_features[1-resnet12]',
        'test_model_forward_fx[1-resnet12]', 'test_model_backward_fx[2-resnet12]',
        'test_model_forward_fx_torchscript[1-resnet12]', 'test_model_forward_intermediates[1-resnet12]',
        'test_model_forward_intermediates_features[1-resnet12]'}


def outcomes(junit: Path) -> dict:
    "Each test of a JUnit XML report: 'passed', or 'failure', 'error' or 'skipped'."
    return {case.get('name'): next((c.tag for c in case if c.tag in ('failure', 'error', 'skipped')), 'passed')
            for case in ET.parse(junit).iter('testcase')}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_timm_model_suite(tmp_path):
    if not SUITE.is_file():
        pytest.fail(f"timm's tests are not in {SUITE.parent}: `make {SUITE.relative_to(ROOT)}` fetches them "
                    f"(pip download --no-deps --no-binary :all: timm=={timm.__version__}, unpacked in .cache/)")
    # one thread: timm's tests on a busy 2-core machine take half the time
    env = {**os.environ, 'OMP_NUM_THREADS': '1',
           'PYTHONPATH': os.pathsep.join([str(ROOT), str(ROOT / 'tests'), os.environ.get('PYTHONPATH', '')])}
    junit = tmp_path / 'timm.xml'
    # timm's own pytest configuration (its markers) from its folder, nothing imported from there but the test file
    run = subprocess.run([sys.executable, '-m', 'pytest', 'tests/test_models.py', '-k', 'resnet12', '-q',
                          '-p', 'timm_suite_plugin', '-p', 'no:cacheprovider', '--import-mode=importlib',
                          f'--junitxml={junit}'],
                         cwd=SUITE.parents[1], env=env, capture_output=True, text=True)
    assert junit.is_file(), run.stdout[-3000:] + run.stderr[-3000:]
    got = outcomes(junit)
    assert got == dict.fromkeys(WANT, 'passed'), run.stdout[-6000:]
    assert run.returncode == 0
