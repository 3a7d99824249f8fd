"""Every shipped config in experiments/ runs end to end on a tiny model, its grid shrunk with
`--set`-style overrides, so a config that cannot run fails CI (not hours into a real run).

The overrides shrink sizes only (model, counts, lengths, steps); every choice the config makes
(variants, tasks, modes, scopes, detection source, claims) runs as shipped."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mechinterp.config import load_config
from mechinterp.experiments.extension import ExtensionConfig, run_extension
from mechinterp.experiments.study import StudyConfig, run_study

EXPERIMENTS = Path(__file__).parents[2] / "experiments"
SHIPPED = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))

STUDY_SHRINK = [
    "detect.niah.needles=[0,1]", "detect.niah.lengths=[400]", "detect.niah.depths=[0.5]",
    "detect.gate=null", "detect.top_k=3", "detect.max_new_tokens=6",
    "knockout.niah.needles=[4]", "knockout.niah.lengths=[400]", "knockout.niah.depths=[0.5]",
    "knockout.mdqa.n=2", "knockout.mdqa.n_docs=2", "knockout.ks=[1,2]", "knockout.seeds=[0]",
    "knockout.target=gold", "knockout.max_new_tokens=6",
    "patch.n_pairs=1", "patch.seeds=[0]", "patch.max_tries=2",
    "addressing.niah.needles=[0,2]", "addressing.max_new_tokens=6", "addressing.receivers=2",
    "addressing.draws=1", "addressing.size=2",
    "claims.k=2",
]
EXTENSION_SHRINK = [
    "n_train=3", "n_eval=2", "n_detect=2", "n_docs=2", "doc_words=20", "max_new_tokens=6",
    "lora.r=2", "lora.steps=2", "lora.save_every=2", "lora.batch_size=1", "lora.max_tokens=2048",
    "detect.gate=null", "detect.top_k=3", "detect.max_new_tokens=6", "detect.batch_size=2",
    "knockout.ks=[1,2]", "knockout.seeds=[0]", "knockout.target=gold",
    "cross_seeds=[0]", "claims.k=2",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from mechinterp.models.tiny import tiny_model

    directory = tmp_path_factory.mktemp("shipped-configs-model")
    tiny_model(n_kv_heads=2, n_layers=3, directory=directory)
    return directory


def test_every_shipped_config_is_covered():
    assert SHIPPED == ["extension-3task-mini", "extension-full", "extension-mini",
                       "extension-multihop-mini", "study", "study-addressing", "study-large",
                       "study-long"]  # fmt: skip


def shrink_tasks(config: ExtensionConfig) -> ExtensionConfig:
    """A multi-task config's per-task sizes back to the shrunk shared ones (citation keeps the
    4 documents its 2 insights × 2 documents need), and a limited baseline that fits n_train."""
    import dataclasses

    tasks = tuple(dataclasses.replace(t, n_docs=4 if t.task == "citation" else None,
                                      doc_words=None, max_new_tokens=None)
                  for t in config.tasks)  # fmt: skip
    return dataclasses.replace(config, tasks=tasks, limited=2 if config.limited else None)


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_config_runs_end_to_end(name, tiny_dir, tmp_path):
    path = EXPERIMENTS / f"{name}.yaml"
    model = [f"model.name={tiny_dir}", "model.dtype=float32", "model.device=cpu"]
    if name.startswith("extension"):
        shipped = load_config(ExtensionConfig, path)
        extra = ["lofit.spec.steps=2", "lofit.top_share=0.25"] if shipped.lofit else []
        limited = ["limited=2"] if shipped.limited else []
        config = load_config(ExtensionConfig, path, [*model, *EXTENSION_SHRINK, *extra, *limited])
        out = run_extension(shrink_tasks(config), out=tmp_path / "run", png=False,
                            progress=False)  # fmt: skip
        tasks = [t.task for t in shipped.tasks]
        assert [p.name for p in sorted(out.iterdir()) if p.name in tasks] == sorted(tasks)
        ran = [out / t for t in tasks] or [out]
        modes = set(pd.concat(pd.read_parquet(d / "knockout.parquet") for d in ran)["mode"])
    else:
        shipped = load_config(StudyConfig, path)
        config = load_config(StudyConfig, path, [*model, *STUDY_SHRINK])
        out = run_study(config, out=tmp_path / "run", png=False, progress=False)
        modes = set(pd.read_parquet(out / "knockout.parquet")["mode"])
        if shipped.addressing.kinds:  # every pair built and asked (a random model answers none)
            pairs = pd.read_parquet(out / "addressing.parquet")
            assert set(pairs["corruption"]) <= set(shipped.addressing.kinds)
            assert len(pairs[pairs["kind"] == "pair"]) >= 1
    assert (out / "report.md").is_file()
    # The choices under test ran as shipped.
    assert modes - {"none"} == set(shipped.knockout.modes)  # "none": the unknocked baseline
    assert config.knockout.scope == shipped.knockout.scope
