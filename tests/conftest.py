"""Shared fixtures: tiny MHA/GQA/MQA models (unit) and the embedded SmolLM2 (integration)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Runtime-check jaxtyping shapes of the library under pytest.
from jaxtyping import install_import_hook  # noqa: E402

with install_import_hook("mechinterp", "beartype.beartype"):
    import mechinterp.analysis.headsets  # noqa: F401
    import mechinterp.detect  # noqa: F401
    import mechinterp.evaluate  # noqa: F401
    import mechinterp.heads  # noqa: F401

import pytest  # noqa: E402
import torch  # noqa: E402

KV_LAYOUTS = {"mha": 4, "gqa": 2, "mqa": 1}


@pytest.fixture(scope="session", params=list(KV_LAYOUTS), ids=list(KV_LAYOUTS))
def tiny(request, tmp_path_factory):
    """A 2-layer, 4-head random Llama with 4 (MHA), 2 (GQA) or 1 (MQA) KV heads."""
    from mechinterp.models.tiny import tiny_model

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return tiny_model(n_kv_heads=KV_LAYOUTS[request.param], directory=directory)


@pytest.fixture(scope="session")
def tiny_gqa(tmp_path_factory):
    from mechinterp.models.tiny import tiny_model

    return tiny_model(n_kv_heads=2, directory=tmp_path_factory.mktemp("tiny-gqa-single"))


@pytest.fixture(scope="session")
def smollm():
    """The embedded default model (converted once into the user cache)."""
    from mechinterp.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def tiny_study_config(tmp_path_factory):
    """`make(**changes) -> StudyConfig`: the study on a 3-layer tiny random model (seconds).
    Random models never answer, so it teacher-forces gold answers and takes the top 3 heads as
    the retrieval set."""
    from mechinterp.experiments.specs import ModelSpec
    from mechinterp.experiments.study import StudyConfig
    from mechinterp.experiments.study.config import (
        ClaimSettings,
        DetectStage,
        KnockoutStage,
        MdqaSpec,
        NiahSpec,
        PatchStage,
    )
    from mechinterp.models.tiny import tiny_model

    directory = tmp_path_factory.mktemp("tiny-study-model")
    tiny_model(n_kv_heads=2, n_layers=3, directory=directory)

    def make(**changes) -> StudyConfig:
        base = dict(
            model=ModelSpec(name=str(directory)),
            detect=DetectStage(
                niah=NiahSpec(needles=(0, 1), lengths=(500,), depths=(0.5,)), gate=None,
                top_k=3, max_new_tokens=8,
            ),
            knockout=KnockoutStage(
                niah=NiahSpec(needles=(4, 5), lengths=(500,), depths=(0.0, 1.0), seed=1),
                mdqa=MdqaSpec(n=2, n_docs=2), ks=(1, 2, 4), seeds=(0, 1), target="gold",
                max_new_tokens=8, examples_per_shard=2,
            ),
            patch=PatchStage(n_pairs=2, seeds=(0, 1), max_tries=2),
            claims=ClaimSettings(k=2),
        )  # fmt: skip
        base.update(changes)
        return StudyConfig(**base)

    return make


@pytest.fixture(scope="session")
def tiny_study(tiny_study_config, tmp_path_factory):
    """A finished study run directory on the tiny model."""
    from mechinterp.experiments.study import run_study

    out = tmp_path_factory.mktemp("tiny-study") / "run"
    return run_study(tiny_study_config(), out=out, png=False, progress=False)


@pytest.fixture
def kill_after(monkeypatch):
    """`restore = kill_after(n)`: sweeps stop with KeyboardInterrupt (a simulated kill) once n
    more shards are written; `restore()` lets them run normally again."""
    from mechinterp import runner

    real = runner.write_shard

    def install(n: int):
        written = []

        def killed(*args, **kwargs):
            if len(written) == n:
                raise KeyboardInterrupt
            written.append(args[1].name)
            real(*args, **kwargs)

        monkeypatch.setattr(runner, "write_shard", killed)
        return lambda: monkeypatch.setattr(runner, "write_shard", real)

    return install
