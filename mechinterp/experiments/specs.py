"""What every run shares: the model and task specs, building a task's examples, loading the model,
the provenance facts every run records, and reading a head-score table."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from mechinterp.errors import InputError
from mechinterp.tasks.example import TASK_NAMES, Example, TaskName

Haystack = Literal["essays", "filler"]

#: Short flags a command declares (`FLAG_ALIASES` on its config class) beside the dotted ones.
MODEL_ALIASES = {"--model": "model.name"}
DEVICE_ALIASES = {"--device": "model.device", "--dtype": "model.dtype",
                  "--attention": "model.attention"}  # fmt: skip
TASK_ALIASES = {**MODEL_ALIASES, "--task": "task.task", "--lengths": "task.lengths",
                "--depths": "task.depths", "--needles": "task.needles",
                "--data": "task.data"}  # fmt: skip


def selection_aliases(section: str) -> dict[str, str]:
    """`--heads`, `--scores`, `--top-k`, `--threshold` for a `HeadSelection` field `section`."""
    return {f"--{k.replace('_', '-')}": f"{section}.{k}"
            for k in ("heads", "scores", "top_k", "threshold")}  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load, and how (see `mechinterp.models.load_model`)."""

    name: str = "smollm2-135m"
    """embedded name (smollm2-135m), a .gguf file, a local HF model or LoRA directory, or a model
    id in the local HF cache"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """weights' dtype"""
    device: str | None = None
    """cpu, cuda, cuda:1, ... (none: cuda when available, else cpu)"""
    rope_theta: float | None = None
    """override the RoPE base frequency (context extension)"""
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | None = None
    """split the layers over the visible devices, as transformers does (instead of a device)"""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """sdpa: the fused kernel wherever no hook needs the full pattern (scores compute only the
    rows they read); eager: the explicit T × T attention in every layer"""

    def __post_init__(self) -> None:
        if self.device is not None and self.device_map is not None:
            raise InputError("give device or device_map, not both")
        if self.device is not None:
            from mechinterp.models.load import check_device

            check_device(self.device, available=False)  # this machine's devices: at load time
        if self.rope_theta is not None and not self.rope_theta > 0:
            raise InputError(f"rope_theta must be > 0, got {self.rope_theta}")

    def load(self):
        from mechinterp.models import load_model

        return load_model(self.name, dtype=self.dtype, device=self.device,
                          rope_theta=self.rope_theta, device_map=self.device_map,
                          attention=self.attention)  # fmt: skip


@dataclass(frozen=True)
class TaskSpec:
    """Which examples to build. NIAH uses lengths × depths × needles; the QA tasks use `data`
    (a user's JSONL file) or a synthetic `variant` with `n` examples of `n_docs` documents."""

    task: TaskName = "niah"
    """the task"""
    lengths: tuple[int, ...] = (256, 512, 1024, 2048)
    """NIAH context lengths in tokens, comma-separated"""
    depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    """NIAH needle depths in [0, 1], comma-separated"""
    needles: int = 4
    """number of NIAH needles, the first ones of `mechinterp.tasks.niah.NEEDLES` (1-16)"""
    needle_ids: tuple[int, ...] = ()
    """NIAH needles by index into `mechinterp.tasks.niah.NEEDLES` (0-15), comma-separated, as
    the study's `niah.needles` names them (e.g. its held-out set); given, it replaces `needles`"""
    haystack: Haystack = "essays"
    """NIAH haystack: Paul Graham essays, or repetitive filler"""
    data: str | None = None
    """your data: JSONL (lost-in-the-middle format for mdqa, MuSiQue for multihop) or a
    Summary-of-a-Haystack JSON haystack for citation"""
    variant: str = "realistic-high"
    """synthetic QA variant: realistic-high|realistic-low|templated-high|templated-low|symbolic"""
    n: int = 20
    """QA examples (synthetic count, or the most read from --data)"""
    n_docs: int = 10
    """documents per synthetic QA example"""
    seed: int = 0
    """seed of the examples"""

    def __post_init__(self) -> None:
        if self.task not in TASK_NAMES:
            raise InputError(f"unknown task {self.task!r}; expected one of {TASK_NAMES}")
        if any(not 16 <= n <= 1_000_000 for n in self.lengths):
            raise InputError(f"lengths must be token counts >= 16, got {self.lengths}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise InputError(f"depths must lie in [0, 1], got {self.depths}")
        if self.haystack not in ("essays", "filler"):
            raise InputError(f"haystack must be 'essays' or 'filler', got {self.haystack!r}")
        if self.data is not None and self.task == "niah":
            raise InputError("--data applies to mdqa and multihop; NIAH builds its own grid")
        if self.data is not None and not Path(self.data).is_file():
            what = "is not a file" if Path(self.data).exists() else "does not exist"
            raise InputError(f"data file {self.data} {what}")
        from mechinterp.tasks.niah import NEEDLES

        if not 1 <= self.needles <= len(NEEDLES):
            raise InputError(f"needles must lie in [1, {len(NEEDLES)}], got {self.needles}")
        if any(not 0 <= i < len(NEEDLES) for i in self.needle_ids):
            raise InputError(f"needle_ids are indices into the {len(NEEDLES)} NIAH needles "
                             f"(0-{len(NEEDLES) - 1}), got {list(self.needle_ids)}")  # fmt: skip
        if len(set(self.needle_ids)) != len(self.needle_ids):
            raise InputError(f"needle_ids repeat a needle: {list(self.needle_ids)}; give each once")
        if not self.lengths or not self.depths:
            raise InputError("lengths and depths need at least one value each")
        if self.n < 1 or self.n_docs < 1:
            raise InputError(f"n and n_docs must be >= 1, got n={self.n}, n_docs={self.n_docs}")
        parse_variant(self.variant)

    @property
    def slug(self) -> str:
        """`niah-essays`, `mdqa-realistic-high`, `multihop-<data file stem>`, ..."""
        if self.data is not None:
            return f"{self.task}-{Path(self.data).stem}"
        return f"niah-{self.haystack}" if self.task == "niah" else f"{self.task}-{self.variant}"


def check_inputs(config) -> None:
    """What a run can check before its model loads (about 40 s for the embedded model): the
    config's lists (`mechinterp.config.check_lists`), every data file it names, read through
    its task's loader, and every head-score table it names."""
    from mechinterp.config import check_lists

    check_lists(config)
    for value in _nested(config):
        if isinstance(value, TaskSpec) and value.data is not None:
            qa_examples(value.task, data=value.data, n=value.n, variant=value.variant,
                        n_docs=value.n_docs, seed=value.seed)  # fmt: skip
    for name, value in _named_fields(config):
        if name.endswith("scores") and isinstance(value, str):
            read_head_scores(value)


def _nested(config):
    """`config` and every dataclass config inside it."""
    yield config
    for _, value in _named_fields(config):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _nested(value)


def _named_fields(config):
    """(name, value) of each field of `config` and of the configs nested in it."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        yield f.name, value
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _named_fields(value)


def _load(config, model):
    """(model, start time, load seconds): the config's model unless one is passed in."""
    t0 = time.perf_counter()
    model = config.model.load() if model is None else model
    return model, t0, time.perf_counter() - t0


def _run_facts(card, config) -> dict:
    """Provenance every run records: model card, allocator tuning, task seed."""
    from mechinterp.models.load import tune_allocator

    return {
        "model_card": card.to_dict(),
        "malloc_tuned": tune_allocator(),
        "seed": config.task.seed,
    }


def parse_variant(variant: str) -> tuple[str, str]:
    """`"realistic-high"` → ("realistic", "high"); `"symbolic"` → ("symbolic", "high")."""
    from mechinterp.tasks.needles import NEEDLE_REALISMS

    realism, _, diversity = variant.partition("-")
    diversity = diversity or "high"
    if realism not in NEEDLE_REALISMS or diversity not in ("high", "low"):
        raise InputError(
            f"unknown variant {variant!r}; expected realistic-high, realistic-low, "
            "templated-high, templated-low or symbolic"
        )
    return realism, diversity


def build_examples(task: TaskSpec, tokenizer) -> list[Example]:
    """The examples a `TaskSpec` describes (deterministic from its seed)."""
    if task.task == "niah":
        from mechinterp.tasks.niah import niah_grid

        return niah_grid(
            tokenizer,
            lengths=task.lengths,
            depths=task.depths,
            needles=list(task.needle_ids) or task.needles,
            haystack=task.haystack,
            seed=task.seed,
        )
    return qa_examples(task.task, data=task.data, n=task.n, variant=task.variant,
                       n_docs=task.n_docs, seed=task.seed)  # fmt: skip


def qa_examples(
    task: str, *, data: str | None, n: int, variant: str, n_docs: int, seed: int,
    doc_words: int | None = None, skip: int = 0,
) -> list[Example]:  # fmt: skip
    """Examples `skip`..`skip + n` of a user's file (`data`: lost-in-the-middle JSONL for mdqa,
    MuSiQue for multihop, a SummHay haystack for citation), or `n` synthetic examples of
    `variant` (`doc_words`: the generator's default when None)."""
    from mechinterp.tasks.citation import load_summhay, synthetic_citation
    from mechinterp.tasks.mdqa import load_mdqa, synthetic_mdqa
    from mechinterp.tasks.multihop import load_musique, synthetic_multihop

    loaders = {"mdqa": load_mdqa, "multihop": load_musique, "citation": load_summhay}
    makers = {"mdqa": synthetic_mdqa, "multihop": synthetic_multihop,
              "citation": synthetic_citation}  # fmt: skip
    if task not in loaders:
        raise InputError(f"{task!r} is not a QA task; expected one of {sorted(loaders)}")
    if data:
        return loaders[task](data, limit=skip + n)[skip:]
    realism, diversity = parse_variant(variant)
    extra = {} if doc_words is None else {"doc_words": doc_words}
    return makers[task](n, n_docs=n_docs, realism=realism, diversity=diversity, seed=seed,
                        **extra)  # fmt: skip


def read_head_scores(path: str | Path) -> pd.DataFrame:
    """A head-score table (`scores.parquet`/`.csv`, or a detection run directory holding one),
    sorted best first (ties: lower layer, then lower head)."""
    path = Path(path)
    path = path / "scores.parquet" if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"head-score table {path} does not exist")
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise InputError(f"{path} is not a head-score table: it does not read as "
                         f"{'parquet' if path.suffix == '.parquet' else 'CSV'} ({e})") from None
    missing = {"layer", "head", "score"} - set(table.columns)
    if missing:
        raise InputError(f"{path} is not a head-score table (missing {sorted(missing)})")
    table = _check_score_rows(path, table)
    return table.sort_values(["score", "layer", "head"], ascending=[False, True, True])


def _check_score_rows(path: Path, table: pd.DataFrame) -> pd.DataFrame:
    """`table` with integer layers and heads and float scores, or an error for a table that
    would rank silently wrong: a score that is missing, NaN or not a finite number (its head
    would drop out of the ranking and could be drawn as a random head), a layer or head that is
    not a non-negative integer, or a head listed twice. Rows are named as the file counts them
    (CSV: the line number, after the header)."""

    def where(bad) -> str:
        name = (lambda i: f"line {i + 2}") if path.suffix != ".parquet" else (lambda i: f"row {i}")
        shown = [name(i) for i, b in enumerate(bad) if b]
        return ", ".join(shown[:5]) + (" …" if len(shown) > 5 else "")

    score = pd.to_numeric(table["score"], errors="coerce").astype(float)
    bad = ~(score.abs() < float("inf"))
    if bad.any():
        raise InputError(f"{path}: score is missing, NaN or not a finite number at "
                         f"{where(bad)}; every head needs a score (drop the row to leave a head "
                         "out)")  # fmt: skip
    index = {}
    for col in ("layer", "head"):
        num = pd.to_numeric(table[col], errors="coerce").astype(float)
        bad = ~((num >= 0) & (num == num.round()) & (num < 2**31))
        if bad.any():
            raise InputError(f"{path}: {col} is not a non-negative integer at {where(bad)}")
        index[col] = num.astype(int)
    clean = table.assign(layer=index["layer"], head=index["head"], score=score)
    repeated = clean.duplicated(["layer", "head"], keep=False)
    if repeated.any():
        firsts = clean[repeated].drop_duplicates(["layer", "head"])
        heads = ", ".join(f"L{la}H{h}" for la, h in zip(firsts["layer"], firsts["head"],
                                                          strict=True))  # fmt: skip
        raise InputError(f"{path}: heads listed twice: {heads} (at {where(repeated)}); give "
                         "each head one row")  # fmt: skip
    return clean


def heads_from_scores(
    path: str | Path, shape, *, threshold: float | None = None, top_k: int | None = None
) -> tuple:
    """The heads a head-score table selects (score > `threshold`, or the `top_k` best), best
    first, validated against the model's shape."""
    from mechinterp.heads import Head, parse_heads

    if (threshold is None) == (top_k is None):
        raise InputError("select heads by exactly one of threshold= or top_k=")
    table = read_head_scores(path)
    if threshold is not None:
        table = table[table["score"] > threshold]
    else:
        table = table.head(top_k)
    return parse_heads(
        [Head(int(a), int(b)) for a, b in zip(table["layer"], table["head"], strict=True)],
        shape,
    )
