#!/usr/bin/env bash
# On the GPU host, after the parts are staged: install, generate the random 8B checkpoint, start
# vLLM on it (the flags the benchmark uses), time readiness and one 256-token completion, stop.
# Derisks the full run (scripts/gpu/bench-gpu.sh) for the price of one short call.
#   bash scripts/gpu/smoke.sh            (writes $OUT/smoke.log and $OUT/vllm.log)
set -euo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/smoke.log") 2>&1
here=$(cd "$(dirname "$0")" && pwd)
t0=$(date +%s.%N)
el() { python3 -c "import time; print(f'{time.time() - $t0:6.1f} s')"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bash "$here/stage-install.sh"
export PYTHONPATH=/root/site PATH=/root/site/bin:$PATH
echo "[$(el)] installed"
MODEL=${MODEL:-/root/llama-8b-random}
[ -f "$MODEL/model.safetensors.index.json" ] || python3 "$here/make_model.py" --tokenizer /root/stage/tokenizer --out "$MODEL"
echo "[$(el)] model ready"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name llama-8b-random \
  --host 127.0.0.1 --port "$port" --max-num-seqs 16 --max-model-len 4096 --dtype bfloat16 \
  --gpu-memory-utilization 0.90 ${VLLM_EXTRA_ARGS:-} > "$OUT/vllm.log" 2>&1 &
vpid=$!
trap 'kill $vpid 2>/dev/null; wait $vpid 2>/dev/null' EXIT
ts=$(date +%s)
up() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null; }
until up "http://127.0.0.1:$port/v1/models"; do
  kill -0 $vpid 2>/dev/null || { echo "vLLM died"; tail -60 "$OUT/vllm.log"; exit 1; }
  [ $(( $(date +%s) - ts )) -lt 420 ] || { echo "vLLM not ready in 420 s"; tail -30 "$OUT/vllm.log"; exit 1; }
  sleep 2
done
echo "[$(el)] vLLM ready after $(( $(date +%s) - ts )) s"
python3 - "$port" <<'PY'
import json, sys, time, urllib.request
port = sys.argv[1]
def complete(n):
    body = json.dumps({"model": "llama-8b-random", "prompt": "The history of the city", "max_tokens": n,
                       "temperature": 0, "ignore_eos": True}).encode()
    t = time.time()
    r = json.load(urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                                                 {"Content-Type": "application/json"})))
    return time.time() - t, r
complete(8)
d1, _ = complete(1)
d, r = complete(256)
print(f"one stream: 1 token {d1*1e3:.0f} ms; 256 tokens {d:.2f} s -> {(d - d1) / 255 * 1e3:.2f} ms/token; "
      f"usage {r['usage']}; text {r['choices'][0]['text'][:80]!r}")
PY
grep -E "Available KV cache|GPU KV cache size|Maximum concurrency|init engine|torch.compile takes|Graph capturing finished" "$OUT/vllm.log" | cut -c1-220 || true
echo "[$(el)] smoke done"
