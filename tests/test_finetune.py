"""LoRA fine-tuning on a tiny model: the loss falls, the checkpoint reloads (merged) to the
trained model's logits, training is deterministic, and divergence keeps the last good checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from mechinterp.finetune import DivergedError, LoraSpec, train_lora
from mechinterp.models import load_model
from mechinterp.tasks.niah import niah_grid


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from mechinterp.models.tiny import tiny_model

    directory = tmp_path_factory.mktemp("lora-base")
    tiny_model(n_kv_heads=2, directory=directory)
    return directory


@pytest.fixture(scope="module")
def examples(base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return niah_grid(tok, lengths=[400], depths=[0.5], needles=3)


def _ids(n=40):
    return torch.randint(5, 100, (1, n), generator=torch.Generator().manual_seed(3))


def test_lora_lowers_the_training_loss_and_reloads_to_the_trained_logits(base, examples, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = LoraSpec(r=4, alpha=8, lr=1e-2, steps=40, batch_size=3, save_every=20)
    result = train_lora(base, examples, spec, tmp_path / "ckpt", device="cpu", progress=False)
    # full-batch steps on a random model: measured 4.63 -> 3.96 (attention-only LoRA)
    assert result.losses[-1] < result.losses[0] - 0.4, result.losses
    record = json.loads((tmp_path / "ckpt" / "mechinterp_finetune.json").read_text())
    assert record["steps_done"] == 40 and len(record["losses"]) == 40 and record["seconds"] > 0

    merged = load_model(tmp_path / "ckpt", device="cpu")  # the base with the adapter merged
    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager"), tmp_path / "ckpt"
    ).eval()
    plain = load_model(base, device="cpu")
    with torch.no_grad():
        ours, ref, before = merged(_ids()), unmerged(_ids()).logits, plain(_ids())
    assert (ours - ref).abs().max().item() < 1e-4
    assert (ours - before).abs().max().item() > 1e-2


def test_training_is_deterministic_from_the_seed(base, examples, tmp_path):
    spec = LoraSpec(r=2, lr=5e-3, steps=6, save_every=6, seed=7)
    a = train_lora(base, examples, spec, tmp_path / "a", device="cpu", progress=False)
    b = train_lora(base, examples, spec, tmp_path / "b", device="cpu", progress=False)
    assert a.losses == b.losses
    c = train_lora(base, examples, LoraSpec(r=2, lr=5e-3, steps=6, save_every=6, seed=8),
                   tmp_path / "c", device="cpu", progress=False)  # fmt: skip
    assert c.losses != a.losses


def test_divergence_stops_and_keeps_the_last_good_checkpoint(base, examples, tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step
    calls = []

    def poisoned(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    spec = LoraSpec(r=2, lr=1e-3, steps=10, save_every=1)
    with pytest.raises(DivergedError, match="step 2.*last good checkpoint is kept"):
        train_lora(base, examples, spec, tmp_path / "ckpt", device="cpu", progress=False)
    record = json.loads((tmp_path / "ckpt" / "mechinterp_finetune.json").read_text())
    assert record["steps_done"] == 2
    model = load_model(tmp_path / "ckpt", device="cpu")
    with torch.no_grad():
        assert torch.isfinite(model(_ids())).all()


def test_bad_inputs_are_refused(base, tmp_path):
    with pytest.raises(ValueError, match="no training examples"):
        train_lora(base, [], LoraSpec(steps=1), tmp_path / "x", device="cpu", progress=False)
    with pytest.raises(ValueError, match="lr must be positive"):
        LoraSpec(lr=0)
