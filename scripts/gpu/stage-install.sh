#!/usr/bin/env bash
# On the GPU host: reassemble the split wheels in /root/stage, check them against the manifest,
# install everything into /root/site (--no-deps: the image already has torch 2.11.0+cu130 that
# vllm==0.26.0 pins) and verify that vllm, envoy and tokenslice import.  Idempotent: a second
# call only re-verifies.
#   bash scripts/gpu/stage-install.sh && export PYTHONPATH=/root/site PATH=/root/site/bin:$PATH
set -euo pipefail
STAGE=${STAGE:-/root/stage}
SITE=${SITE:-/root/site}
PY=${PY:-python3}
cd "$STAGE"
if [ ! -f "$SITE/.installed" ]; then
  for first in *.whl.part-000; do
    [ -e "$first" ] || continue
    whl=${first%.part-000}
    cat "$whl".part-* > "$whl" && rm -f "$whl".part-*
  done
  [ -f MANIFEST.sha256 ] || { echo "MANIFEST.sha256 missing: stage the last part too" >&2; exit 1; }
  sha256sum --quiet -c MANIFEST.sha256 || { echo "staged wheels incomplete or corrupt" >&2; exit 1; }
  t0=$(date +%s)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" ./*.whl
  touch "$SITE/.installed"
  echo "installed $(ls ./*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - t0 )) s"
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
$PY - <<'PY'
"""Fail loudly here, not minutes later inside the benchmark."""
import os, stat, sys, time
t = time.time()
import torch
import vllm
import envoy
import tokenslice
binary = os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy")
os.chmod(binary, os.stat(binary).st_mode | stat.S_IXUSR)
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  vllm {vllm.__version__}  "
      f"cuda {torch.cuda.is_available()} {torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}  "
      f"tokenslice {tokenslice.__file__}  envoy {binary}  (imports {time.time() - t:.1f} s)")
PY
