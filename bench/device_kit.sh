#!/usr/bin/env bash
# Build .whl/: wheels for CPython 3.12 on x86-64 of what fsmtl needs that the GPU machine lacks (bench/device_kit.txt),
# so that bench/device_run.sh can install them there, where no package registry is reachable. Run here, from anywhere:
#   bash bench/device_kit.sh
# It needs pip with network access and a Python 3.12 (python3.12, else pyenv's) with a C compiler to build learn2learn.
# It ends by printing the size of what travels with the repository (at most 64 MiB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
kit=bench/device_kit.txt
py=${PYTHON:-python3}
# the first Python 3.12 that runs (a pyenv shim on the PATH may not)
for py312 in ${PYTHON312:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12.*/bin/python3.12 none; do
  "$py312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && break
done
[ "$py312" != none ] || { echo "device_kit.sh: no Python 3.12 to build wheels for the GPU machine: install one, or name it in PYTHON312" >&2; exit 1; }
# pip matches manylinux tags one by one: these are the ones the kit's wheels use, and the machine's glibc (2.39) takes
# them all; learn2learn's own build is tagged linux_x86_64
target=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none --only-binary :all:
        --platform linux_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_24_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64)
pins=$(sed 's/#.*//' "$kit" | awk 'NF')
l2l=$(grep '^learn2learn==' <<<"$pins")
cache=.cache/device-kit
new=$(mktemp -d)
trap 'rm -rf "$new"' EXIT

if [ ! -x "$cache/py312/bin/cython" ]; then
  "$py312" -m venv "$cache/py312"
  "$cache/py312/bin/python" -m pip install -q --upgrade pip setuptools wheel cython
fi
build() { "$cache/py312/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$cache" "$@"; }
# a pin's wheel in the cache: wheel names spell a distribution's hyphens as underscores
cached() { local name=${1%%==*}; ls "$cache/${name//-/_}-${1#*==}"-*.whl 2>/dev/null; }

# Every pin as published, without its dependencies (the kit list names all that travels): its wheel where there is
# one, else (gym) a wheel built here from its source package, with Python 3.12, kept in the cache.
for pin in $(grep -v '^learn2learn==' <<<"$pins"); do
  "$py" -m pip download -q --no-deps "${target[@]}" -d "$new" "$pin" 2>/dev/null && continue
  cached "$pin" >/dev/null || build --no-binary :all: "$pin"
  cp $(cached "$pin") "$new"
done

# learn2learn 0.2.0 publishes no wheel, and its source ships C files an old Cython made that do not compile on 3.12:
# regenerate them with a current Cython, as tools/install.sh does, and build its wheel with Python 3.12.
if ! cached "$l2l" >/dev/null; then
  src=$(mktemp -d)
  "$cache/py312/bin/python" -m pip download -q --no-deps --no-binary :all: "$l2l" -d "$src"
  tar -xzf "$src"/learn2learn-*.tar.gz -C "$src"
  (cd "$src"/learn2learn-*/ && "$OLDPWD/$cache/py312/bin/cython" -3 learn2learn/data/*.pyx)
  build "$src"/learn2learn-*/
  rm -rf "$src"
fi
cp $(cached "$l2l") "$new"

# The kit must hold one wheel of each pin, each one pip takes for CPython 3.12 on x86-64: resolve them all from it alone.
n_pins=$(wc -l <<<"$pins") n_wheels=$(ls "$new"/*.whl | wc -l)
[ "$n_pins" = "$n_wheels" ] || { echo "device_kit.sh: $n_wheels wheels for $n_pins pins" >&2; exit 1; }
xargs "$py" -m pip install -q --dry-run --ignore-installed --no-index --no-deps --find-links "$new" "${target[@]}" \
  --target "$new/dry-run" <<<"$pins"
rm -rf .whl && mv "$new" .whl && mkdir "$new"
ls -l .whl

# What travels: the files git tracks or would track, and the kit.
repo=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "kit: $n_wheels wheels, $(mib "$wheels"); repository $(mib "$repo"); travels: $(mib $((repo + wheels))) of 64 MiB"
[ $((repo + wheels)) -lt $((64 * 1048576)) ] || { echo "device_kit.sh: over the 64 MiB that may travel" >&2; exit 1; }
