"""Build the tiny offline model: a byte-level BPE tokenizer + a random-weight Llama.

Runs under the *engine* venv's python (it needs torch, tokenizers, safetensors);
it imports nothing from tokenslice so it can run there standalone::

    $CACHE/engine-venv/bin/python tokenslice/engine/build_model.py OUT_DIR

Everything is deterministic -- a seeded text generator for the corpus, a
single-threaded BPE trainer, a seeded torch generator for the weights, and
hand-written JSON -- so two builds are byte-identical.

Random weights alone make a poor test model: EOS (or some junk byte) is argmax
after a few tokens for many prompts, and greedy decoding falls into a short
loop.  Two dedicated residual channels fix that (the attention and MLP output
projections never write to them, so they hold exactly what the embedding put
there):

* channel 0 is a constant, so column 0 of ``lm_head`` acts as a per-token
  logit *bias*.  It is strongly negative for EOS, the other special tokens and
  every token that is not printable ASCII: output is always valid ASCII text
  (no partial UTF-8 at chunk boundaries) and EOS is never emitted by accident
  (though ``logit_bias: {"1": 50}`` still forces EOS, as clients expect).
* channel 1 is the "stop trigger": only the embedding of the trigger token
  (:data:`STOP_TRIGGER`, the word ``" Goodbye."``) sets it, and ``lm_head``'s
  EOS row reads it with a large weight.  So EOS comes right after that token:
  a prompt ending in it finishes with ``finish_reason == "stop"`` after exactly
  one generated token (the EOS itself, no text); and the model itself emits
  the trigger token now and then (it has a mild bias), so some prompts end
  naturally a few dozen to hundreds of tokens in (``tokenslice engine bench``
  counts how many).

The unembedding is centred against the mean final hidden state, so no handful
of tokens wins every step, and the attention value/output weights are scaled up
so the context, not just the last token, decides the next token: different
prompts give different text.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

RECIPE = {
    "seed": 20261127,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "vocab_target": 3072,
    "corpus_sentences": 12000,
}

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
SPECIAL_TOKENS = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]
PAD = "<|pad|>"
STOP_TRIGGER = " Goodbye."
"""Text whose (single) token makes EOS the argmax next token."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + content | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_WORDS = """
the of and to in is was it for on that with as at by this from be are have not or an but which one you
all were we when there can more if no out so said what up its about into than them time only new some
could these two may first then do any like my now over such our man me even most made after also did many
before must through back years where much your way well down should because each just those people how too
little state good very make world still own see men work long get here between both life being under never
day same another know while last might us great old year off come since against go came right used take
three states himself few house use during without again place around however home small found thought
went say part once general high upon school every does got united left number course war until always away
something fact though water less public put think almost hand enough far took head yet government system
better set told nothing night end why called didn find going look asked later knew point next city business
give group toward young let room president side social given present several order national possible rather
second face per among form important often things looked early white case john become large big need four
within felt along children saw best church ever least power development light thing seemed family interest
want members mind country area others done turned although open problem sense matter process river stone
garden window letter morning evening music story question answer reason money paper market village forest
mountain ocean island bridge engine signal token slice chunk queue tenant priority server request kernel
memory cache model layer vector matrix graph packet router cluster node pod gateway scheduler policy
""".split()
_SYLLABLES = ("ka ti ro mu sa le ve no pi da ru ko mi ta ze lo ba fi ne su ra do ki me go pa li vo "
              "sha tru ple nor vel gan dri sto fen mal quo rix bel tam cor").split()
_PUNCT = [".", ".", ".", ",", ",", "!", "?", ";", ":"]
_CODE = [
    "def {a}({b}, {c}):\n    return {b} + {c}\n",
    "for {a} in range({n}):\n    print({a})\n",
    "if {a} > {n}:\n    {b} = {c}\n",
    "{a} = [{n}, {m}, {k}]\n",
    "class {A}:\n    def __init__(self):\n        self.{a} = {n}\n",
]


def corpus(seed: int, sentences: int) -> list[str]:
    """A deterministic English-like + code-like training corpus (no downloads)."""
    rng = random.Random(seed)
    pseudo = sorted({"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(1500)})
    vocab = _WORDS * 4 + pseudo
    lines: list[str] = []
    for i in range(sentences):
        if i % 10 == 9:
            lines.append(rng.choice(_CODE).format(
                a=rng.choice(_WORDS), b=rng.choice(_WORDS), c=rng.choice(pseudo), A=rng.choice(pseudo).title(),
                n=rng.randint(0, 999), m=rng.randint(0, 99), k=rng.randint(0, 9)))
            continue
        words = [rng.choice(vocab) for _ in range(rng.randint(4, 18))]
        words[0] = words[0].capitalize()
        text = " ".join(words) + rng.choice(_PUNCT)
        if i % 7 == 0:
            text += f" {rng.randint(0, 10 ** rng.randint(1, 6))}"
        lines.append(text)
    lines.extend([STOP_TRIGGER.strip()] * 50 + [f"Thanks and{STOP_TRIGGER}"] * 50)
    return lines


def build_tokenizer(out: Path) -> "object":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=RECIPE["vocab_target"], min_frequency=2, show_progress=False,
        special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(RECIPE["seed"], RECIPE["corpus_sentences"]), trainer=trainer)
    if len(tok.encode(STOP_TRIGGER).ids) != 1:  # one token, so "the prompt ends in it" is well defined
        tok.add_tokens([STOP_TRIGGER])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    tok.save(str(out / "tokenizer.json"), pretty=True)

    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in SPECIAL_TOKENS}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": RECIPE["max_position_embeddings"],
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD})
    return tok


def _printable(token: str) -> bool:
    """Whether a byte-level token decodes to printable ASCII (or newline/tab)."""
    byte_of = _gpt2_unicode_to_byte()
    try:
        data = bytes(byte_of[c] for c in token)
    except KeyError:
        return False
    return all(32 <= b < 127 or b in (9, 10) for b in data)


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """The GPT-2 byte <-> printable-unicode map that the ByteLevel pre-tokenizer uses."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def build_weights(out: Path, tok: "object") -> dict[str, object]:
    import torch
    from safetensors.torch import save_file

    r = RECIPE
    vocab_size = tok.get_vocab_size()  # type: ignore[attr-defined]
    padded_vocab = (vocab_size + 63) // 64 * 64
    d, ff, layers = r["hidden_size"], r["intermediate_size"], r["num_hidden_layers"]
    heads, kv_heads = r["num_attention_heads"], r["num_key_value_heads"]
    head_dim = d // heads
    g = torch.Generator().manual_seed(r["seed"])

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float32) * std

    const, trigger = 0, 1
    vocab = tok.get_vocab()  # type: ignore[attr-defined]
    eos_id = vocab[EOS]
    trigger_id = tok.token_to_id(STOP_TRIGGER)  # type: ignore[attr-defined]

    embed = randn(padded_vocab, d, std=1.0)
    embed[:, const] = 6.0
    embed[:, trigger] = 0.0
    embed[trigger_id, trigger] = 6.0

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": embed}
    for i in range(layers):
        p = f"model.layers.{i}."
        o_proj = randn(d, heads * head_dim, std=2.0 / (heads * head_dim) ** 0.5)
        down = randn(d, ff, std=1.0 / ff ** 0.5)
        o_proj[[const, trigger], :] = 0.0  # the dedicated channels stay as the embedding set them
        down[[const, trigger], :] = 0.0
        sd.update({
            p + "self_attn.q_proj.weight": randn(heads * head_dim, d, std=1.5 / d ** 0.5),
            p + "self_attn.k_proj.weight": randn(kv_heads * head_dim, d, std=1.5 / d ** 0.5),
            p + "self_attn.v_proj.weight": randn(kv_heads * head_dim, d, std=2.0 / d ** 0.5),
            p + "self_attn.o_proj.weight": o_proj,
            p + "mlp.gate_proj.weight": randn(ff, d, std=1.0 / d ** 0.5),
            p + "mlp.up_proj.weight": randn(ff, d, std=1.0 / d ** 0.5),
            p + "mlp.down_proj.weight": down,
            p + "input_layernorm.weight": torch.ones(d),
            p + "post_attention_layernorm.weight": torch.ones(d),
        })
    sd["model.norm.weight"] = torch.ones(d)

    lm_head = randn(padded_vocab, d, std=0.35)
    lm_head[:, const] = 0.0
    lm_head[:, trigger] = 0.0
    sd["lm_head.weight"] = lm_head
    config = _llama_config(d, ff, layers, heads, kv_heads, head_dim, padded_vocab, vocab)

    # Center the unembedding: random weights give every final hidden state a large shared
    # component, and the few tokens aligned with it would win every step.
    mean = _mean_final_hidden(config, sd, tok)
    mean[[const, trigger]] = 0.0
    u = mean / mean.norm()
    lm_head -= (lm_head @ u)[:, None] * u[None, :]

    # After the final RMSNorm h[const] is 0.75-1.1 and the best random logit 3.5-13.5.  Both
    # channels carry the same value (6.0) in the embedding, so h[trigger] == h[const] at a trigger
    # position: EOS's logit there is (50 - 15) * h[const] >= 26, above every random logit;
    # everywhere else it is -15 * h[const] <= -11, never the argmax, yet a client's
    # ``logit_bias: {EOS: 50}`` still makes it the argmax (>= 33).
    id_to_token = {i: t for t, i in vocab.items()}
    for i in range(padded_vocab):
        token = id_to_token.get(i)
        if token is None or token in SPECIAL_TOKENS or (i != trigger_id and not _printable(token)):
            lm_head[i, :] = 0.0
            lm_head[i, const] = -40.0  # never emitted
    lm_head[eos_id, const] = -15.0
    lm_head[eos_id, trigger] = 50.0
    lm_head[trigger_id, const] = 2.0  # the model says the trigger word now and then
    sd["lm_head.weight"] = lm_head

    save_file({k: v.contiguous() for k, v in sorted(sd.items())}, str(out / "model.safetensors"),
              metadata={"format": "pt"})

    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {
        "bos_token_id": vocab[BOS], "eos_token_id": eos_id, "pad_token_id": vocab[PAD], "do_sample": False})
    return {"vocab_size": vocab_size, "padded_vocab_size": padded_vocab, "eos_id": eos_id, "bos_id": vocab[BOS],
            "stop_trigger_id": trigger_id, "params": sum(v.numel() for v in sd.values())}


def _llama_config(d: int, ff: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                  padded_vocab: int, vocab: dict[str, int]) -> dict[str, object]:
    r = RECIPE
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d,
        "intermediate_size": ff,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": r["max_position_embeddings"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "vocab_size": padded_vocab,
        "bos_token_id": vocab[BOS],
        "eos_token_id": vocab[EOS],
        "pad_token_id": vocab[PAD],
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "use_cache": True,
    }
    return config


def _mean_final_hidden(config: dict[str, object], sd: dict[str, "object"], tok: "object") -> "object":
    """Mean post-norm final hidden state over corpus text (rounded, so it is reproducible bit for bit)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(sd)
    model.eval()
    lines = corpus(RECIPE["seed"] + 1, 400)
    states = []
    with torch.no_grad():
        for i in range(0, len(lines), 20):
            ids = tok.encode(" ".join(lines[i:i + 20])).ids[:256]  # type: ignore[attr-defined]
            states.append(model.model(torch.tensor([ids])).last_hidden_state[0])
    return torch.cat(states).mean(0).round(decimals=2)


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    os.environ["RAYON_NUM_THREADS"] = "1"  # single-threaded BPE training: reproducible merges
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    info = build_weights(out, tok)
    info.update({"stop_trigger": STOP_TRIGGER, "eos_token": EOS, "bos_token": BOS, "recipe": RECIPE})
    _write_json(out / "tokenslice_model.json", info)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
