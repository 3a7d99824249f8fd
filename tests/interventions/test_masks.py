"""Masks that hold on any model: left padding read from the attention mask (not from a head's
attention row, which a sliding window moves), a finite "large negative" in every dtype, and
`run_from_layer` refusing a model that transforms `inputs_embeds` inside its forward."""

import pytest
import torch

from mechinterp.evaluate import left_pad
from mechinterp.heads import Head
from mechinterp.interventions import KnockoutSpec, knockout
from mechinterp.interventions.knockout import large_negative
from mechinterp.interventions.patching import check_resumable, resumable, run_from_layer
from mechinterp.models.load import boot_bridge
from mechinterp.models.tiny import char_tokenizer, tiny_model

WINDOW = 4


@pytest.fixture(scope="module")
def sliding(tmp_path_factory):
    """A tiny random Mistral whose sliding window (4) is shorter than the test prompts."""
    from transformers import MistralConfig, MistralForCausalLM

    directory = tmp_path_factory.mktemp("tiny-mistral")
    tok = char_tokenizer(directory)
    config = MistralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
        max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model.save_pretrained(directory)
    return boot_bridge(model, tok, directory, model_id="tiny-mistral", dtype=torch.float32,
                       device="cpu")


def _logits(model, prompts, spec):
    ids, mask = left_pad(model, prompts)
    with torch.no_grad(), knockout(model, spec):
        return model(ids, attention_mask=mask), mask


@pytest.mark.parametrize("mode", ["edge_knockout", "zero"])
def test_knockout_on_a_padded_batch_equals_each_row_alone_under_a_sliding_window(sliding, mode):
    long, short = list(range(10, 22)), list(range(30, 35))  # 12 and 5 tokens, window 4
    extra = {"key_positions": (8, 9)} if mode == "edge_knockout" else {}
    spec = KnockoutSpec(heads=(Head(1, 1), Head(0, 2)), mode=mode, query_positions=(9, 10, 11),
                        **extra)
    together, mask = _logits(sliding, [long, short], spec)
    for r, prompt in enumerate([long, short]):
        alone, _ = _logits(sliding, [prompt], spec) if r == 0 else (None, None)
        if alone is None:  # the short row has none of the knocked-out positions
            with torch.no_grad():
                alone = sliding(torch.tensor([prompt]))
        real = together[r][mask[r].bool()]
        torch.testing.assert_close(real, alone[0], atol=1e-5, rtol=0)
    # and the knockout really acted on the long row
    with torch.no_grad():
        plain = sliding(torch.tensor([long]))
    assert (plain[0] - together[0]).abs().max() > 1e-3


def test_the_large_negative_number_is_finite_in_every_dtype():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        value = torch.tensor(large_negative(dtype), dtype=dtype)
        assert torch.isfinite(value) and value < -1e4


def test_cutting_every_key_of_a_row_in_float16_gives_finite_outputs(tmp_path):
    model = tiny_model(n_kv_heads=2, dtype=torch.float16, directory=tmp_path)
    ids = torch.tensor([[1, 10, 11, 12, 13, 14]])
    spec = KnockoutSpec(heads=(Head(1, 1),), mode="edge_knockout", query_positions=(2,),
                        key_positions=(0, 1, 2))  # every key query 2 may see
    got = {}
    with torch.no_grad(), knockout(model, spec), model.hooks(
        fwd_hooks=[("blocks.1.attn.hook_pattern", lambda x, hook: got.setdefault("p", x))]
    ):
        logits = model(ids)
    assert torch.isfinite(logits).all()
    row = got["p"][0, 1, 2, :3].float()
    torch.testing.assert_close(row, torch.full((3,), 1 / 3), atol=1e-3, rtol=0)  # uniform


def test_run_from_layer_follows_a_model_that_transforms_inputs_embeds(tmp_path):
    """Embeddings scaled inside the model's forward (as Gemma does) are not applied twice: the
    resumed forward replaces block L's input, whatever the forward did before it."""
    model = tiny_model(n_kv_heads=2, n_layers=3, directory=tmp_path)
    inner = model.original_model.model

    def double(module, args, kwargs):  # as a model that scales embeddings inside forward would
        if kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"] = 2 * kwargs["inputs_embeds"]
        return args, kwargs

    handle = inner.register_forward_pre_hook(double, with_kwargs=True)
    try:
        del model.mechinterp_resumable
        assert resumable(model)
    finally:
        handle.remove()


def test_run_from_layer_refuses_a_model_whose_layers_share_state_beyond_the_residual(tmp_path):
    """A block that feeds a later block through something other than the residual stream cannot
    be skipped: the load-time probe sees the resumed forward differ and every resume refuses."""
    model = tiny_model(n_kv_heads=2, n_layers=3, directory=tmp_path)
    assert model.mechinterp_resumable  # probed at load: a plain Llama resumes exactly
    side: dict = {}

    def remember(module, args, output):
        side["x"] = output.mean()

    def use(module, args, kwargs):
        return (args[0] + side.get("x", 0.0), *args[1:]), kwargs

    handles = [
        model.blocks[0].register_forward_hook(remember),
        model.blocks[2].register_forward_pre_hook(use, with_kwargs=True),
    ]
    try:
        del model.mechinterp_resumable
        with pytest.raises(NotImplementedError, match="does not reproduce the model's own"):
            check_resumable(model)
        with pytest.raises(NotImplementedError, match="llama: resuming a forward"):
            run_from_layer(model, torch.zeros(1, 3, model.cfg.d_model), 1)
    finally:
        for handle in handles:
            handle.remove()
