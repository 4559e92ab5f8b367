#!/usr/bin/env bash
# fsmtl's GPU checks as one command, for a GPU machine that has torch but not fastai or learn2learn and reaches no
# package registry. Run from the repository root, with the .whl/ that bench/device_kit.sh built beside it:
#   bash bench/device_run.sh                # on the GPU: the four steps below, at most 8 minutes in all
#   bash bench/device_run.sh --device cpu   # a smoke run of the same steps, tiny sizes, gloo instead of NCCL
# It installs the kit into a folder put on PYTHONPATH (the machine's own packages stay as they are), checks that fsmtl
# imports with the machine's torch (bench/device_check.py), then runs each step under its own time limit:
# bench/gpu.py (training images a second, fp32 against bf16 + channels-last, the loader alone beside them),
# bench/probe.py (the LogisticProbe on the device against the scikit-learn loop on the CPU), bench/recipe_epoch.py (an
# epoch of the mini-ImageNet 5-shot recipe's shape and the full recipe's estimated time) and bench/ddp.py --nproc 1
# (the data-parallel path under torchrun). Each step's output goes to $OUT/<step>.txt where $OUT is set (else to a
# temporary folder), and one table sums them up at the end. It exits non-zero if any step failed or ran out of time.
set -u
usage() { echo "usage: bash bench/device_run.sh [--device cuda|cpu]" >&2; exit 2; }
device=cuda
while [ $# -gt 0 ]; do
  case $1 in
    --device) [ $# -ge 2 ] || usage; device=$2; shift 2 ;;
    *) usage ;;
  esac
done
case $device in cuda | cpu) ;; *) usage ;; esac
cd "$(dirname "$0")/.."
out=${OUT:-$(mktemp -d)}
py=${PYTHON:-python3}
site=${KIT_SITE:-/tmp/fsmtl-kit}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
rows=()
failed=0

# The lines of a step's output that hold its figures.
figures() {
  grep -E '^(fp32 [0-9].*img/s|loader alone|  .*\(not the pin\)|[15]-shot: |epoch: |full recipe: |1 process|.*under torchrun|ratio: )' "$1"
}

# Run step $1 under a limit of $2 seconds (then killed, with its children): its output to the screen and to
# $out/$1.txt; its outcome, its seconds and its figures go to the summary.
step() {
  local name=$1 limit=$2 t0=$SECONDS rc status line
  shift 2
  echo "== $name (limit $limit s): $*"
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out" ;;
    *) status="failed ($rc)" ;;
  esac
  [ "$rc" = 0 ] || failed=1
  rows+=("$(printf '%-8s %-11s %5s' "$name" "$status" $((SECONDS - t0)))")
  while IFS= read -r line; do rows+=("$(printf '%27s%s' '' "$line")"); done < <(figures "$out/$name.txt")
}

summary() {
  {
    echo "== summary: $device; $(head -1 "$out/check.txt")"
    printf '%-8s %-11s %5s  %s\n' step status s figures
    printf '%s\n' "${rows[@]}"
  } | tee "$out/summary.txt"
  exit $failed
}

# The kit is for CPython 3.12, the GPU machine's Python; a smoke run elsewhere uses the packages its Python has.
if [ -d .whl ] && "$py" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  timeout 30 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || { echo "the kit did not install into $site" | tee "$out/check.txt"; failed=1; summary; }
  export PYTHONPATH=$PYTHONPATH:$site
  echo "kit: $(ls .whl/*.whl | wc -l) wheels installed into $site"
else
  echo "kit: not installed ($([ -d .whl ] || echo 'there is no .whl/; '))$py is not the Python 3.12 it is for: $py's own packages are used"
fi

# fsmtl must import with the machine's torch before anything is measured.
step check 40 "$py" bench/device_check.py "$device" "$site"
[ "$failed" = 0 ] || summary
# The limits, the kit's install and the 5 s grace of each kill included, add up to 455 s, within the 8 minutes.
if [ "$device" = cuda ]; then
  step gpu 100 "$py" bench/gpu.py --device cuda --steps 100
  step probe 80 "$py" bench/probe.py --device cuda
  step recipe 110 "$py" bench/recipe_epoch.py --device cuda
  step ddp 70 "$py" bench/ddp.py --nproc 1 --steps 8
else
  tiny=(--size 16 --channels 4,8,8,16)
  step gpu 60 "$py" bench/gpu.py --device cpu --steps 2 --warmup 1 --tasks 1 --per-class 10 "${tiny[@]}"
  step probe 60 "$py" bench/probe.py --device cpu --episodes 20 --train-steps 0 --dataset glyphs-small
  step recipe 60 "$py" bench/recipe_epoch.py --device cpu
  step ddp 120 "$py" bench/ddp.py --nproc 1 --steps 2 --tasks 1 "${tiny[@]}"
fi
summary
