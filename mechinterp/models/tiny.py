"""Tiny random Llama models for tests: built from a config in-process, no downloads.

`n_kv_heads` = `n_heads` gives MHA, 1 < n_kv_heads < n_heads GQA, 1 MQA. The tokenizer is
character-level (every printable ASCII character one token, plus chat special tokens) so that
offsets are exact and prompts of known token length are easy to build.
"""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

from mechinterp.models.load import boot_bridge

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def char_tokenizer(directory: str | Path):
    """A character-level fast tokenizer, saved to `directory` and reloaded from disk.

    (The bridge re-reads tokenizers from disk; one built only in memory breaks it.)
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "</s>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def tiny_model(
    *,
    n_kv_heads: int = 2,
    n_heads: int = 4,
    n_layers: int = 2,
    d_model: int = 64,
    n_ctx: int = 2048,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attention_bias: bool = False,
    directory: str | Path | None = None,
) -> TransformerBridge:
    """A randomly initialised Llama (seeded) wrapped in a TransformerBridge, with a model card.
    `attention_bias` gives the q/k/v/o projections biases (random, so that they matter)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
    directory = Path(directory or tempfile.mkdtemp(prefix="mechinterp-tiny-"))
    tokenizer = char_tokenizer(directory)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=d_model // n_heads,
        max_position_embeddings=n_ctx,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attention_bias=attention_bias,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    # Random init gives near-uniform attention; sharpen it so heads differ visibly.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
            for proj in "qkvo" if attention_bias else "":
                getattr(layer.self_attn, f"{proj}_proj").bias.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    return boot_bridge(
        model,
        tokenizer,
        directory,
        model_id=f"tiny-llama-h{n_heads}-kv{n_kv_heads}",
        dtype=dtype,
        device="cpu",
    )
