#!/usr/bin/env bash
# On the GPU host: append one carried part folder (.whl/pNN) to /root/stage, which outlives the
# call while the machine stays warm.  Kept tiny so the next call can follow at once.
#   bash scripts/gpu/stage-part.sh .whl/p01
set -euo pipefail
STAGE=${STAGE:-/root/stage}
mkdir -p "$STAGE"
for part in "$@"; do
  cp -rf "$part"/* "$STAGE"/
  echo "staged $part: $(ls "$part" | wc -l) files; $STAGE now $(du -sm "$STAGE" | cut -f1) MiB"
done
