"""Tiny random models for tests: built from a config in-process, no downloads.

`tiny_model` is a Llama (`n_kv_heads` = `n_heads` gives MHA, 1 < n_kv_heads < n_heads GQA, 1 MQA);
`tiny_family(name)` builds one of the architecture matrix's `FAMILIES` (Mistral, Qwen2, Gemma 2/3,
Phi-3, GPT-2, GPT-NeoX, OLMo-2, Cohere-2, …), each sized so that its sliding windows are shorter
than the test prompts. The tokenizer is
character-level (every printable ASCII character one token, plus chat special tokens) so that
offsets are exact and prompts of known token length are easy to build.
"""

from __future__ import annotations

import re
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

from mechinterp.errors import InputError
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
        raise InputError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
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
    _sharpen(model)
    model.save_pretrained(directory)
    return boot_bridge(
        model,
        tokenizer,
        directory,
        model_id=f"tiny-llama-h{n_heads}-kv{n_kv_heads}",
        dtype=dtype,
        device="cpu",
    )

@dataclass(frozen=True)
class Family:
    """One architecture of the test matrix: how to build a tiny random model of it, and what it
    exercises (`features`, for the support table in docs/models.md)."""

    name: str
    config_class: str
    model_class: str
    features: str
    options: dict = field(default_factory=dict)


_WINDOW = 5  # sliding windows shorter than every test prompt

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama-mha", "LlamaConfig", "LlamaForCausalLM", "MHA, RoPE",
               {"num_key_value_heads": 4}),
        Family("llama-gqa", "LlamaConfig", "LlamaForCausalLM", "GQA (2 query heads per KV head)",
               {"num_key_value_heads": 2}),
        Family("llama-mqa", "LlamaConfig", "LlamaForCausalLM", "MQA (one KV head)",
               {"num_key_value_heads": 1}),
        Family("mistral", "MistralConfig", "MistralForCausalLM",
               f"sliding window ({_WINDOW}) on every layer, GQA",
               {"num_key_value_heads": 2, "sliding_window": _WINDOW}),
        Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "q/k/v biases, GQA",
               {"num_key_value_heads": 2}),
        Family("gemma2", "Gemma2Config", "Gemma2ForCausalLM",
               "attention and final logit soft-capping, local/global layers, scaled embeddings, "
               "query_pre_attn_scalar",
               {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": _WINDOW,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0,
                "query_pre_attn_scalar": 24}),
        Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM",
               "q/k norms, local/global layers with different RoPE bases, MQA, scaled embeddings",
               {"num_key_value_heads": 1, "head_dim": 32, "sliding_window": _WINDOW,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention",
                                "sliding_attention"],
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                    "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                }}),
        Family("phi3", "Phi3Config", "Phi3ForCausalLM", "fused qkv and gate/up projections",
               {"num_key_value_heads": 2}),
        Family("gpt2", "GPT2Config", "GPT2LMHeadModel",
               "fused c_attn (Conv1D), learned absolute positions, LayerNorm", {}),
        Family("gpt-neox", "GPTNeoXConfig", "GPTNeoXForCausalLM",
               "partial rotary (25 %), parallel attention and MLP, fused qkv",
               {"rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0,
                                    "partial_rotary_factor": 0.25}}),
        Family("olmo2", "Olmo2Config", "Olmo2ForCausalLM",
               "q/k RMS norms over all heads, post-norm blocks", {"num_key_value_heads": 2}),
        Family("cohere2", "Cohere2Config", "Cohere2ForCausalLM",
               "layers not alike: sliding-window RoPE layers and a global layer without positions; "
               "parallel blocks, logit scale",
               {"num_key_value_heads": 2, "sliding_window": _WINDOW,
                "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                "logit_scale": 0.5}),
        Family("gpt-oss", "GptOssConfig", "GptOssForCausalLM",
               "layers not alike: sliding-window and full layers; learned attention sinks; "
               "mixture-of-experts MLP",
               {"num_key_value_heads": 2, "head_dim": 16, "sliding_window": _WINDOW,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                "num_local_experts": 4, "num_experts_per_tok": 2}),
    )
}


def _family_config(family: Family, tokenizer, *, n_layers: int, d_model: int, n_heads: int,
                   n_ctx: int):
    import transformers

    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    options = dict(family.options)
    layer_types = options.get("layer_types")
    if layer_types is not None:
        n_layers = len(layer_types)
    config_class = getattr(transformers, family.config_class)
    if family.name == "gpt2":
        return config_class(vocab_size=len(tokenizer), n_embd=d_model, n_layer=n_layers,
                            n_head=n_heads, n_positions=n_ctx, tie_word_embeddings=False,
                            **special)  # fmt: skip
    return config_class(
        vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=2 * d_model,
        num_hidden_layers=n_layers, num_attention_heads=n_heads,
        max_position_embeddings=n_ctx, tie_word_embeddings=False, **special, **options,
    )  # fmt: skip


def tiny_family(
    name: str,
    *,
    directory: str | Path | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    d_model: int = 64,
    n_heads: int = 4,
    n_layers: int = 3,
    n_ctx: int = 512,
) -> TransformerBridge:
    """A tiny random model of architecture family `name` (a key of `FAMILIES`), seeded, saved to
    `directory` and booted through the bridge like any local model."""
    import transformers

    if name not in FAMILIES:
        raise InputError(f"unknown family {name!r}; expected one of {sorted(FAMILIES)}")
    family = FAMILIES[name]
    directory = Path(directory or tempfile.mkdtemp(prefix=f"mechinterp-{name}-"))
    tokenizer = char_tokenizer(directory)
    config = _family_config(family, tokenizer, n_layers=n_layers, d_model=d_model,
                            n_heads=n_heads, n_ctx=n_ctx)  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)(config).to(dtype)
    _sharpen(model)
    model.save_pretrained(directory)
    return boot_bridge(model, tokenizer, directory, model_id=f"tiny-{name}", dtype=dtype,
                       device="cpu")  # fmt: skip


_QK_WEIGHTS = re.compile(r"(q_proj|k_proj|qkv_proj|c_attn|query_key_value)\.weight$")
_ATTN_BIASES = re.compile(r"(q_proj|k_proj|v_proj|o_proj|qkv_proj|c_attn|query_key_value)\.bias$")


@torch.no_grad()
def _sharpen(model) -> None:
    """Random init gives near-uniform attention: scale the query/key projections so heads differ
    visibly, and give every attention bias random values so that biases matter. (Fused qkv
    projections scale their values too; harmless.) Learned per-head sinks (GPT-OSS) are drawn."""
    for name, param in model.named_parameters():
        if _QK_WEIGHTS.search(name):
            param.mul_(4.0)
        elif _ATTN_BIASES.search(name):
            param.normal_(0.0, 0.1)
        elif name.endswith("self_attn.sinks"):
            param.normal_(0.0, 1.0)
