"""Generate a random-weight, Llama-3-8B-shaped checkpoint on the GPU (bf16, safetensors).

The GPU host reaches no model hub, so the benchmark serves a checkpoint made here: the
Llama-3-8B architecture (32 layers, hidden 4096, MLP 14336, 32 query / 8 KV heads, rope theta
500000) with the vocabulary of the project's offline tiny tokenizer.  Its text is meaningless,
but every decode step moves the same bytes and runs the same kernels as the real model, which is
what the head-of-line timings depend on.  With the tiny vocabulary it holds ~7.0 B parameters
(Llama-3-8B's 128k-token embeddings are the missing billion).

The rows of ``lm_head`` for the special tokens (EOS included) and the padding ids are zero: the final hidden state's
logit for them is 0 while the best of the ~3k random logits is several sigma above, so greedy
decoding never stops early and 1024-token streams stay 1024 tokens long.

    python3 scripts/gpu/make_model.py --tokenizer .cache/models/tiny-llama --out /root/llama-8b-random
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _tensors(cfg: dict, vocab: int, special: list[int], layers: range, gen: torch.Generator,
             dev: str) -> dict[str, torch.Tensor]:
    h, m = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd

    def rand(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32) * std).to(torch.bfloat16)

    out: dict[str, torch.Tensor] = {}
    for i in layers:
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=dev)
        out[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=dev)
        out[p + "self_attn.q_proj.weight"] = rand(h, h, std=h ** -0.5)
        out[p + "self_attn.k_proj.weight"] = rand(kv, h, std=h ** -0.5)
        out[p + "self_attn.v_proj.weight"] = rand(kv, h, std=h ** -0.5)
        out[p + "self_attn.o_proj.weight"] = rand(h, h, std=0.02)
        out[p + "mlp.gate_proj.weight"] = rand(m, h, std=h ** -0.5)
        out[p + "mlp.up_proj.weight"] = rand(m, h, std=h ** -0.5)
        out[p + "mlp.down_proj.weight"] = rand(h, m, std=0.02)
    if layers.start == 0:
        out["model.embed_tokens.weight"] = rand(vocab, h, std=1.0)
    if layers.stop == cfg["num_hidden_layers"]:
        out["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=dev)
        head = rand(vocab, h, std=h ** -0.5)
        head[special] = 0
        out["lm_head.weight"] = head
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", type=Path, required=True, help="folder with the tiny model's tokenizer + config")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=LLAMA3_8B["num_hidden_layers"])
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=20261127)
    ap.add_argument("--device", default="cuda", help="where to draw the weights (cpu: a slow local check)")
    args = ap.parse_args()

    t0 = time.time()
    tiny = json.loads((args.tokenizer / "config.json").read_text())
    tok = json.loads((args.tokenizer / "tokenizer.json").read_text())
    vocab = int(tiny["vocab_size"])
    ids = [int(t["id"]) for t in tok.get("added_tokens", [])] + list(tok["model"]["vocab"].values())
    # special tokens and the padding rows past the tokenizer's last id: never a greedy pick
    special = sorted({int(t["id"]) for t in tok.get("added_tokens", []) if t.get("special", True)}
                     | {i for i in (tiny.get("bos_token_id"), tiny.get("eos_token_id"), tiny.get("pad_token_id"))
                        if isinstance(i, int)}
                     | set(range(max(ids) + 1, vocab)))
    cfg = dict(LLAMA3_8B, num_hidden_layers=args.layers)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "bfloat16",
        "vocab_size": vocab,
        "max_position_embeddings": args.max_model_len,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": tiny.get("bos_token_id"),
        "eos_token_id": tiny.get("eos_token_id"),
        "pad_token_id": tiny.get("pad_token_id"),
        "initializer_range": 0.02,
        **cfg,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (args.tokenizer / name).exists():
            shutil.copy(args.tokenizer / name, args.out / name)

    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    weight_map: dict[str, str] = {}
    per_shard = 4
    layers_total = cfg["num_hidden_layers"]
    shards = [range(i, min(i + per_shard, layers_total)) for i in range(0, layers_total, per_shard)]
    params = 0
    for n, layers in enumerate(shards, 1):
        fname = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = _tensors(cfg, vocab, special, layers, gen, args.device)
        params += sum(t.numel() for t in tensors.values())
        save_file({k: v.cpu() for k, v in tensors.items()}, str(args.out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
        print(f"  shard {n}/{len(shards)} layers {layers.start}-{layers.stop - 1}  {time.time() - t0:.1f} s",
              flush=True)
    (args.out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": params * 2}, "weight_map": weight_map}, indent=1))
    print(f"random Llama-3-8B-shaped checkpoint: {params / 1e9:.2f} B params, vocab {vocab}, "
          f"{params * 2 / 2**30:.1f} GiB bf16 -> {args.out} in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
