#!/usr/bin/env bash
# The head-of-line benchmark on a GPU host (`make bench-gpu`): vLLM FCFS, vLLM priority, chunking
# without the scheduler and tokenslice at several chunk sizes, side by side, on a random-weight
# Llama-3-8B-shaped model -- the scenario in scripts/gpu/headline-gpu.yaml.  See docs/gpu.md.
#
#   bash scripts/gpu/bench-gpu.sh          prepare + run in the foreground (~15 min), results in $OUT
#   bash scripts/gpu/bench-gpu.sh start    prepare, start the run detached (setsid), follow it for
#                                          $FOLLOW_S seconds (for hosts whose commands are time-boxed)
#   bash scripts/gpu/bench-gpu.sh wait     follow a detached run for $FOLLOW_S seconds; once it has
#                                          ended, copy its results to $OUT (exit 0), else exit 3
#   bash scripts/gpu/bench-gpu.sh collect  copy what $RES holds now to $OUT (results, plots, logs; no keys)
#
# A detached run works from a snapshot of this tree in $RES/src, never from this folder: on the lent
# machine each call gets a fresh copy of the tree and the previous one is removed, which used to pull
# the code (and the working directory) out from under a running benchmark.
#
# Prepare = install the staged wheels from /root/stage (scripts/gpu/stage-*.sh) unless vLLM already
# imports, generate the checkpoint (scripts/gpu/make_model.py), and point the engine helpers
# (tokenslice.engine.server, which runs "the engine venv's" python) at this host's python.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
MODE=${1:-all}
OUT=${OUT:-$REPO/results/gpu}
RES=${RES:-/root/bench-out}
FOLLOW_S=${FOLLOW_S:-540}
MODEL=${MODEL:-/root/llama-8b-random}
SCENARIO=${SCENARIO:-scripts/gpu/headline-gpu.yaml}
# e.g. BENCH_ARGS="--systems tokenslice,vllm-fcfs --chunk-sizes 128,256" for a shorter sweep
BENCH_ARGS=${BENCH_ARGS:-}
# a micro-benchmark instead of the scenario: BENCH_MICRO="slices --parts cut,cutrate ..." runs
# `tokenslice bench micro slices --parts cut,cutrate ... --model $MODEL --out $RES --keep-logs` (docs/gpu.md)
BENCH_MICRO=${BENCH_MICRO:-}
# BACKPORT_PR52923=1: apply vLLM PR #52923 to the installed vLLM 0.26.0 first (the CPU-offload runs)
export TOKENSLICE_CACHE=${TOKENSLICE_CACHE:-/root/ts-cache}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT" "$RES"
t0=$(date +%s)
say() { echo "[bench-gpu $(( $(date +%s) - t0 ))s] $*"; }

prepare() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  if [ -d /root/stage ]; then
    bash scripts/gpu/stage-install.sh
    export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH} PATH=/root/site/bin:$PATH
  fi
  python3 -c 'import vllm' || { echo "vLLM does not import: stage the wheels (docs/gpu.md)" >&2; exit 1; }
  # vLLM 0.26.0's CPU offload needs upstream's fix #52923 (in 0.30.0) to survive a run: opt in, and the
  # log says so (scripts/gpu/backport_pr52923.py)
  [ -z "${BACKPORT_PR52923:-}" ] || python3 scripts/gpu/backport_pr52923.py
  say "installed"
  if [ ! -f "$MODEL/model.safetensors.index.json" ]; then
    tok=/root/stage/tokenizer
    [ -f "$tok/tokenizer.json" ] || tok=$TOKENSLICE_CACHE/models/tiny-llama
    python3 scripts/gpu/make_model.py --tokenizer "$tok" --out "$MODEL"
  fi
  say "model ready: $MODEL"
  # tokenslice.engine.server starts vLLM with "$TOKENSLICE_CACHE/engine-venv/bin/python" and CPU
  # defaults; on the GPU host that is this python, with vLLM's normal multiprocess engine core
  # (the CPU default runs the engine core inside the API server) and PyTorch sampling instead of
  # FlashInfer's, whose kernels would be JIT-compiled with nvcc for ~2 min at every first start.
  # --dtype bfloat16 etc. come from the scenario's vllm_args (later flags win).
  mkdir -p "$TOKENSLICE_CACHE/engine-venv/bin"
  cat > "$TOKENSLICE_CACHE/engine-venv/bin/python" <<EOF
#!/bin/sh
export VLLM_ENABLE_V1_MULTIPROCESSING=1 VLLM_USE_FLASHINFER_SAMPLER=0 OMP_NUM_THREADS=4 PYTHONPATH="${PYTHONPATH:-}"
exec $(command -v python3) "\$@"
EOF
  chmod +x "$TOKENSLICE_CACHE/engine-venv/bin/python"
}

bench_cmd() {  # the benchmark writes its per-chunk breakdown (chunk_breakdown.*) itself
  # BENCH_CMD replaces it only in tests/gpu (no GPU there to run the real one)
  if [ -n "${BENCH_CMD:-}" ]; then echo "$BENCH_CMD"
  elif [ -n "$BENCH_MICRO" ]; then echo "python3 -m tokenslice bench micro $BENCH_MICRO --model $MODEL --out $RES --keep-logs"
  else echo "python3 -m tokenslice bench run $SCENARIO --model $MODEL --out $RES --keep-logs --no-isolate-cpus ${BENCH_ARGS:-}"
  fi
}

snapshot() {  # this tree's code and the scenario, copied where the next call's fresh tree cannot remove them
  rm -rf "$RES/src"; mkdir -p "$RES/src"
  tar cf - --exclude=.git --exclude=.whl --exclude=.venv --exclude=.cache --exclude=results . | tar xf - -C "$RES/src"
  case "$SCENARIO" in /*) ;; *) SCENARIO=$RES/src/$SCENARIO ;; esac
  export PYTHONPATH=$RES/src:$RES/src/sidecar:$RES/src/gateway_ext:$RES/src/operator${PYTHONPATH:+:$PYTHONPATH}
}

collect() {  # at most 8 files come back from a device call: pack plots and logs
  cat "$RES"/prepare.log "$RES"/gpu-apps.log "$RES"/bench.log > "$OUT"/bench.log 2>/dev/null || true
  cp "$RES"/results.md "$RES"/results.json "$RES"/chunk_breakdown.md "$RES"/chunk_breakdown.json "$OUT"/ 2>/dev/null || true
  (cd "$RES" && ls ./*.png >/dev/null 2>&1 && tar cf "$OUT/plots.tar" ./*.png) || true
  runs=$(ls -d "$TOKENSLICE_CACHE"/local/run-* 2>/dev/null || true)
  # GNU tar applies --exclude only to names that come after it: keep it first, or the signing key ships
  [ -z "$runs" ] || tar czf "$OUT/logs.tar.gz" --exclude='*.key' -C "$TOKENSLICE_CACHE/local" \
    $(for r in $runs; do basename "$r"; done) 2>/dev/null || true
  ls -la "$OUT"
}

follow() {  # print the run's new log lines until it ends or FOLLOW_S passes
  local deadline=$(( $(date +%s) + FOLLOW_S )) seen=0
  # anything else on the GPU would skew the timings: say so in the log
  echo "[gpu apps $(date -u +%H:%M:%S)] $(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader | tr '\n' ';')" \
    | tee -a "$RES/gpu-apps.log"
  while :; do
    if [ -f "$RES/bench.log" ]; then
      local n; n=$(wc -l < "$RES/bench.log")
      if [ "$n" -gt "$seen" ]; then sed -n "$((seen + 1)),${n}p" "$RES/bench.log" | grep -vE '\] \[[^]]+\] t=' || true; seen=$n; fi
    fi
    if [ -f "$RES/rc" ]; then say "run ended with $(cat "$RES/rc")"; collect; return 0; fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "still running; last progress: $(tail -1 "$RES/bench.log" 2>/dev/null | cut -c1-160)"; return 3
    fi
    sleep 5  # polling the run's files for new lines, with a deadline
  done
}

case "$MODE" in
  all)
    prepare 2>&1 | tee -a "$RES/prepare.log"
    [ -d /root/site ] && export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH}
    say "running: $(bench_cmd)" | tee -a "$RES/bench.log"
    set +e; bash -c "$(bench_cmd)" 2>&1 | tee -a "$RES/bench.log"; echo "${PIPESTATUS[0]}" > "$RES/rc"; set -e
    collect ;;
  start)
    rm -f "$RES/rc" "$RES/bench.log"
    prepare 2>&1 | tee -a "$RES/prepare.log"
    [ -d /root/site ] && export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH}
    snapshot
    # its own session, so it outlives this command (the machine stays while calls keep coming); it runs
    # in the snapshot, so the next call replacing this folder changes nothing under it
    say "running: $(bench_cmd)" | tee -a "$RES/bench.log"
    (cd "$RES/src" && exec setsid bash -c "$(bench_cmd) >> '$RES/bench.log' 2>&1; echo \$? > '$RES/rc'") \
      < /dev/null > /dev/null 2>&1 &
    say "started detached from $RES/src; following for ${FOLLOW_S}s"
    follow ;;
  wait)
    follow ;;
  collect)
    collect ;;
  *) echo "usage: $0 [all|start|wait|collect]" >&2; exit 2 ;;
esac
