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
