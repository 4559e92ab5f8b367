#!/usr/bin/env bash
# The probe benchmark on a GPU machine that has torch, timm and scikit-learn but not fastai: it reads the episodes'
# features that `python bench/probe.py --save-features .devcache/feats.pt` wrote on a machine with fsmtl installed,
# and times the LogisticProbe on the GPU and on that machine's CPU against the same scikit-learn loop.
# Run from the repository root: bash bench/device.sh [FEATURES]; outputs also go to $OUT when it is set.
set -u
feats=${1:-.devcache/feats.pt}
out=${OUT:-$(mktemp -d)}
py=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )
nvidia-smi -L
$py -c "import torch, sklearn; print('torch', torch.__version__, 'sklearn', sklearn.__version__)"
for dev in cuda cpu; do
    echo "== bench/probe.py --device $dev"
    PYTHONPATH=. timeout 240 $py bench/probe.py --features "$feats" --device $dev 2>&1 | tee "$out/probe-$dev.txt"
done
