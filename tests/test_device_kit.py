"The GPU device kit: fsmtl imports from the GPU machine's packages and the kit's alone, at fsmtl's pins; device_run.sh runs end to end."
import configparser
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
MACHINE, KIT = ROOT / 'bench' / 'gpu_machine_packages.txt', ROOT / 'bench' / 'device_kit.txt'
# what fsmtl imports at start: the library's entry points, and the scripts that device_run.sh runs on the machine
START = ('fsmtl.all', 'fsmtl.cli', 'fsmtl.train', 'fsmtl.distributed', 'gpu', 'probe', 'recipe_epoch', 'ddp', 'device_check')
# the machine's own torch and torchvision are used at their versions there: their wheels are gigabytes, not 64 MiB
MACHINE_TORCH = {'torch', 'torchvision'}
# MetaOptNet's SVM head: left out of the kit (cvxpy's solvers are over 60 MB); learn2learn imports it only if it is there
LEFT_OUT = {'qpth'}


def canonical(name): return re.sub(r'[-_.]+', '-', name).lower()


def listed(path):
    "A package list: canonical name -> version, None where the list gives none."
    lines = (l.split('#')[0].strip() for l in path.read_text().splitlines())
    return {canonical(n): (v or None) for n, _, v in (l.partition('==') for l in lines if l)}


def settings():
    "settings.ini: the pins of fsmtl's requirements, and the names of its optional extras' requirements."
    ini = configparser.ConfigParser()
    ini.read(ROOT / 'settings.ini')
    d = ini['DEFAULT']
    pins = dict(r.split('==') for r in d['requirements'].split() if '==' in r)
    extras = {re.split('[=<>]', r)[0] for k in d if k.endswith('_requirements') and k != 'dev_requirements' for r in d[k].split()}
    return {canonical(k): v for k, v in pins.items()}, {canonical(n) for n in extras}


@pytest.mark.slow
def test_fsmtl_imports_from_the_machines_packages_and_the_kits_alone():
    res = subprocess.run([sys.executable, str(ROOT / 'tests' / 'gpu_imports.py'), str(MACHINE), str(KIT), *START],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, 'PYTHONPATH': str(ROOT)})
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    _, extras = settings()
    refused = {d for r in report['refused'] for d in r['distributions']}
    # only optional packages are missing there, each imported by a guard that falls back without it
    assert refused <= extras | LEFT_OUT, report['refused']
    # and every wheel of the kit is one that fsmtl does import
    assert set(listed(KIT)) <= set(report['imported']), set(listed(KIT)) - set(report['imported'])


def test_the_kit_carries_fsmtls_pins_and_the_versions_tested_here():
    pins, _ = settings()
    kit, machine = listed(KIT), listed(MACHINE)
    for name, version in kit.items():
        assert version, f"{name}: the kit pins every package"
        assert pins.get(name, version) == version, (name, version, pins[name])
        assert md.version(name) == version, f"{name} {version} in the kit, {md.version(name)} tested here"
        # a package the machine has travels only when its version there is another or unknown
        assert machine.get(name, '') != version, name
    for name, pin in pins.items():
        assert name in kit or name in machine, f"{name}: neither in the kit nor on the GPU machine"
        if name not in kit and machine.get(name) not in (None, pin): assert name in MACHINE_TORCH, (name, machine[name], pin)


def test_device_run_refuses_an_unknown_device():
    res = subprocess.run(['bash', str(ROOT / 'bench' / 'device_run.sh'), '--device', 'tpu'], capture_output=True, text=True,
                         timeout=30, cwd=ROOT)
    assert res.returncode == 2 and 'usage' in res.stderr


@pytest.mark.slow
def test_device_run_smoke_runs_every_step_on_the_cpu(tmp_path):
    env = {**os.environ, 'OUT': str(tmp_path), 'PYTHON': sys.executable, 'PYTHONPATH': str(ROOT), 'OMP_NUM_THREADS': '1'}
    res = subprocess.run(['bash', str(ROOT / 'bench' / 'device_run.sh'), '--device', 'cpu'], capture_output=True, text=True,
                         timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    steps = ('check', 'gpu', 'probe', 'recipe', 'ddp')
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f'{s}.txt' for s in steps] + ['summary.txt'])
    summary = (tmp_path / 'summary.txt').read_text()
    assert res.stdout.rstrip().endswith(summary.rstrip())   # the table ends the output
    for s in steps: assert re.search(rf'^{s}\s+ok\s+\d+', summary, flags=re.M), summary
    for s in steps[1:]:
        ratio = re.findall(r'^ratio: ([0-9.]+)$', (tmp_path / f'{s}.txt').read_text(), flags=re.M)
        assert len(ratio) == 1 and float(ratio[0]) > 0 and f'ratio: {ratio[0]}' in summary, s
    check = (tmp_path / 'check.txt').read_text()
    for name in settings()[0]: assert re.search(rf'^  {re.escape(name)}\s+pin \S+\s+found \S+', check, flags=re.M), check
    assert 'process group: gloo, model: DistributedDataParallel' in (tmp_path / 'ddp.txt').read_text()
    assert 'full recipe: at most 200 epochs' in summary
