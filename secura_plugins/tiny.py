"""Tiny, offline causal LMs and tokenizers for demos, tests and the lab.

Nothing here touches the network: the tokenizer is a character-level vocabulary built
in memory, and the models are built from a ``transformers`` config with seeded random
weights. ``save_tiny_checkpoint`` writes a normal Hugging Face checkpoint folder, so
every loading path of the library (``from_pretrained``, 4-bit loading, axolotl's
``base_model:``) is exercised on real files.

Example:
    >>> from secura_plugins.tiny import build_tiny_model, build_tokenizer
    >>> tok = build_tokenizer()
    >>> model = build_tiny_model("llama", vocab_size=len(tok))
    >>> ids = tok("2+2=4", return_tensors="pt").input_ids
    >>> model(ids).logits.shape[-1] == len(tok)
    True
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

import torch

TinyKind = Literal["llama", "qwen2"]

# Printable ASCII is enough for the synthetic corpora used by the lab and the tests.
_CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}

_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tokenizer(save_dir: str | Path | None = None):
    """A character-level ``PreTrainedTokenizerFast`` (about 100 tokens), built offline.

    It has pad/bos/eos/unk tokens and a minimal chat template, so TRL and axolotl can
    use it like any hub tokenizer. With ``save_dir`` it is also written there.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for ch in _CHARS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL_TOKENS["pad"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        model_max_length=512,
    )
    tok.chat_template = _CHAT_TEMPLATE
    if save_dir is not None:
        tok.save_pretrained(str(save_dir))
    return tok


def tiny_config(
    kind: TinyKind = "llama",
    *,
    vocab_size: int = 128,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 256,
):
    """A ``transformers`` config for a tiny Llama or Qwen2-style decoder."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        # Rows of unit-ish norm, as in real LLMs (std 0.02 at width 4096 gives row norms
        # ~1.3); HF's default 0.02 at width 64 would make every row ~8x too small, which
        # skews methods whose update scales with W (SECURA, CURLoRA) unrealistically.
        initializer_range=hidden_size**-0.5,
    )
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        # Qwen2 has biases on q/k/v: a second layer layout for the contract matrix.
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"kind must be 'llama' or 'qwen2', got {kind!r}")


def build_tiny_model(kind: TinyKind = "llama", *, seed: int = 0, **config_kwargs):
    """A seeded, randomly initialised tiny causal LM (fp32, CPU)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind, **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    # Random init puts small values everywhere; give biases non-zero values so that
    # tests which compare outputs cannot pass because a bias happened to be zero.
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for module in model.modules():
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.nn.Parameter):
                bias.normal_(0.0, 0.02)
    return model.eval()


def save_tiny_checkpoint(
    path: str | Path, kind: TinyKind = "llama", *, seed: int = 0, **config_kwargs
) -> Path:
    """Write a tiny model and its tokenizer as a normal Hugging Face checkpoint folder."""
    path = Path(path)
    tok = build_tokenizer()
    config_kwargs.setdefault("vocab_size", len(tok))
    model = build_tiny_model(kind, seed=seed, **config_kwargs)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path
