"""`load_model(spec) -> TransformerBridge`, with a model card on every model.

Sources, in the order a name is tried:

1. an embedded model by short name (`smollm2-135m`);
2. a `.gguf` file: dequantised once and cached by its hash, like the embedded default;
3. a local directory: an HF causal LM, or a LoRA checkpoint (`adapter_config.json`), merged;
4. a model id already in the local HF cache (never downloaded: the hub is off).

A config without `architectures` (a hand-converted checkpoint, say) gets the causal-LM class
transformers registers for its `model_type`, or a clear error when there is none or several.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens.model_bridge import TransformerBridge

from mechinterp.errors import InputError
from mechinterp.heads import check_loaded
from mechinterp.models.embedded import (
    EMBEDDED,
    converted_dir,
    converted_gguf,
    file_sha256,
    resolve_embedded,
)
from mechinterp.models.kv_cache import adapt_bridge

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class ModelCard:
    """What a result needs to say about the model that produced it."""

    id: str
    source: str
    source_sha256: str | None
    dtype: str
    device: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    n_ctx: int
    rope_theta: float | None = None
    lora: str | None = None
    device_map: dict[str, str] | None = None  # module → device, when split over devices
    attention: str = "eager"  # "sdpa": fused attention wherever no hook reads the pattern

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_ALLOCATOR_TUNED: bool | None = None


def tune_allocator() -> bool:
    """Keep glibc's heap from mmap-ing and trimming large tensors (M_MMAP_MAX=0,
    M_TRIM_THRESHOLD=2 GiB), as `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...` would.

    Measured on the 2-core CPU machine: a 4 × 2048-token forward of the embedded model drops from
    ~60 s to ~33 s, because fresh multi-hundred-MB attention tensors stop paying for page faults.
    The price is that freed heap memory stays with the process. Opt out with
    MECHINTERP_MALLOC_TUNING=0. Returns whether the tuning is in force.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is None:
        _ALLOCATOR_TUNED = False
        if os.environ.get("MECHINTERP_MALLOC_TUNING", "1") != "0":
            import ctypes
            import ctypes.util

            name = ctypes.util.find_library("c")
            try:
                libc = ctypes.CDLL(name) if name else None
                mallopt = getattr(libc, "mallopt", None)
            except OSError:
                mallopt = None
            if mallopt is not None:  # glibc only; musl and macOS have no mallopt
                m_trim_threshold, m_mmap_max = -1, -4
                _ALLOCATOR_TUNED = bool(mallopt(m_mmap_max, 0)) and bool(
                    mallopt(m_trim_threshold, 2**31 - 1)
                )
    return _ALLOCATOR_TUNED


def model_card(model: TransformerBridge) -> ModelCard:
    check_loaded(model)
    return model.mechinterp_card


def load_model(
    name_or_path: str | os.PathLike = "smollm2-135m",
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    rope_theta: float | None = None,
    n_ctx: int | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    attention: str = "sdpa",
) -> TransformerBridge:
    """Load a causal LM as a TransformerBridge (raw HF weights).

    `rope_theta` overrides the RoPE base frequency (context extension); `n_ctx` overrides the
    context window the model reports. `device_map` ("auto", "balanced", or a module → device
    dict) and `max_memory` split the layers over devices, as transformers does (instead of
    `device`); inputs go to the embedding's device. The returned bridge has `.mechinterp_card`
    (`ModelCard`). `attention="sdpa"` (the default) runs the fused kernel in every layer whose
    pattern no hook reads, and scores and score-level knockouts compute only the rows they touch
    (`mechinterp.models.attention`); families it cannot serve exactly (soft-capping, sinks, fused
    qkv) stay on the bridge's explicit attention, and `card.attention` says which path a model
    takes. `attention="eager"` forces the explicit T × T computation everywhere.
    """
    if attention not in ("eager", "sdpa"):
        raise InputError(f"attention must be 'eager' or 'sdpa', got {attention!r}")
    torch_dtype = _dtype(dtype)
    tune_allocator()
    if device_map is not None or max_memory is not None:
        if device is not None:
            raise InputError("give device= or device_map= (and max_memory=), not both")
        if device_map is None:
            raise InputError("max_memory= needs device_map= (e.g. device_map='auto')")
        for where in (device_map.values() if isinstance(device_map, dict) else ()):
            check_device(str(where) if not isinstance(where, int) else f"cuda:{where}")
        placement = {"device_map": device_map, "max_memory": max_memory}
    else:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_device(device)
        placement = {}
    name = str(name_or_path)
    embedded = resolve_embedded(name)
    if embedded is not None:
        directory, sha = converted_dir(embedded)
        model_id = embedded.name
        source = f"pypi:{embedded.package}=={embedded.version}/{embedded.filename}"
    elif _is_gguf(name):
        directory, sha = converted_gguf(name)
        model_id, source = Path(name).name.removesuffix(".gguf"), str(Path(name).resolve())
    elif Path(name).expanduser().is_dir():
        directory = Path(name).expanduser().resolve()
        if (directory / "adapter_config.json").is_file():
            return _placed(_load_lora(directory, dtype=torch_dtype, device=device,
                                      rope_theta=rope_theta, n_ctx=n_ctx, placement=placement),
                           device_map, attention)  # fmt: skip
        if not (directory / "config.json").is_file():
            raise InputError(
                f"{directory} is not an HF model directory (no config.json) nor a LoRA "
                "checkpoint (no adapter_config.json)"
            )
        model_id, source, sha = directory.name, str(directory), _weights_sha(directory)
    else:
        directory = _from_hf_cache(name)
        model_id, source, sha = name, str(directory), _weights_sha(directory)
    hf_model, tokenizer = _load_hf(directory, torch_dtype, rope_theta, n_ctx, **placement)
    bridge = _boot(hf_model, tokenizer, directory, model_id=model_id, source=source, sha=sha,
                   dtype=torch_dtype, device=device, lora=None)  # fmt: skip
    return _placed(bridge, device_map, attention)


def _placed(bridge: TransformerBridge, device_map, attention: str) -> TransformerBridge:
    """Record the requested `device_map` on the card where transformers realised none (every
    module on the CPU: nothing to dispatch), and the attention path the model runs."""
    from mechinterp.models.attention import use_sdpa

    card = bridge.mechinterp_card
    if device_map is not None and card.device_map is None:
        shown = {str(k): str(v) for k, v in device_map.items()} if isinstance(device_map, dict) \
            else {"": str(device_map)}  # fmt: skip
        card = dataclasses.replace(card, device_map=shown)
    if attention == "sdpa" and use_sdpa(bridge):
        card = dataclasses.replace(card, attention="sdpa")
    bridge.mechinterp_card = card
    return bridge


def check_device(device: str, *, available: bool = True) -> None:
    """Refuse a device string torch cannot parse, or (`available`) one this machine lacks."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(
            f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps)"
        ) from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"device {device!r}: only cpu, cuda and mps are supported")
    if not available:
        return
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r}: this machine has no CUDA GPU (use device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device {device!r}: MPS is not available here (use device cpu)")


def boot_bridge(
    hf_model,
    tokenizer,
    directory: str | Path,
    *,
    model_id: str,
    dtype: torch.dtype,
    device: str,
    source: str | None = None,
    sha: str | None = None,
    lora: str | None = None,
) -> TransformerBridge:
    """Wrap an in-memory HF model in a bridge and attach its card (used for tiny test models).

    The tokenizer must have been loaded from disk (`directory`): the bridge re-reads it there.
    """
    return _boot(
        hf_model,
        tokenizer,
        Path(directory),
        model_id=model_id,
        source=source or str(directory),
        sha=sha,
        dtype=dtype,
        device=device,
        lora=lora,
    )


def _boot(hf_model, tokenizer, directory: Path, *, model_id, source, sha, dtype, device, lora):
    hf_model.eval()
    config = hf_model.config
    if not set(getattr(config, "architectures", None) or [type(hf_model).__name__]) & (
        _bridge_architectures()
    ):
        raise InputError(
            f"{config.model_type} ({', '.join(config.architectures or [type(hf_model).__name__])})"
            " is not an architecture the TransformerLens bridge supports, so mechinterp cannot "
            "hook it; see docs/models.md for the families that are tested"
        )
    bridge = TransformerBridge.boot_transformers(
        str(directory), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.eval()
    adapt_bridge(bridge)
    from mechinterp.interventions.patching import resumable

    resumable(bridge)  # probed now, with no hooks attached; run_from_layer refuses a False
    cfg = hf_model.config
    bridge.mechinterp_card = ModelCard(
        id=model_id,
        source=source,
        source_sha256=sha,
        dtype=str(dtype).removeprefix("torch."),
        device=str(bridge.cfg.device if device is None else device),
        n_layers=int(bridge.cfg.n_layers),
        n_heads=int(bridge.cfg.n_heads),
        n_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or bridge.cfg.n_heads),
        d_model=int(bridge.cfg.d_model),
        d_head=int(bridge.cfg.d_head),
        n_ctx=int(bridge.cfg.n_ctx),
        rope_theta=_rope_theta(cfg),
        lora=lora,
        device_map=({k: str(v) for k, v in hf_model.hf_device_map.items()}
                    if getattr(hf_model, "hf_device_map", None) else None),  # fmt: skip
    )
    return bridge


def load_hf(
    name_or_path: str | os.PathLike = "smollm2-135m",
    *,
    dtype: str | torch.dtype = "float32",
    rope_theta: float | None = None,
):
    """(HF model, tokenizer, directory, model id) of a base model by `load_model`'s rules
    (embedded name, local directory or local HF cache), unwrapped: for fine-tuning."""
    tune_allocator()
    directory, model_id, _ = _base_location(str(name_or_path), Path.cwd())
    model, tokenizer = _load_hf(directory, _dtype(dtype), rope_theta, None)
    return model, tokenizer, directory, model_id


FINETUNE_RECORD = "mechinterp_finetune.json"


def _load_hf(directory: Path, dtype, rope_theta, n_ctx, **placement):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    if not getattr(config, "architectures", None):
        config.architectures = [causal_lm_class(config, directory)]
    if rope_theta is not None:
        _set_rope_theta(config, rope_theta)
    if n_ctx is not None:
        config.max_position_embeddings = int(n_ctx)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory,
            config=config,
            dtype=dtype,
            attn_implementation="eager",
            local_files_only=True,
            **{k: v for k, v in placement.items() if v is not None},
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(
            f"could not load weights from {directory} ({type(e).__name__}: {e}); the files may "
            "be incomplete or corrupt: delete the directory and re-create it"
        ) from e
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer


def _load_lora(
    directory: Path, *, dtype, device, rope_theta, n_ctx, placement: dict
) -> TransformerBridge:
    """A peft LoRA checkpoint: load its base with `load_model`'s rules, merge, boot."""
    from peft import PeftModel

    adapter_cfg = json.loads((directory / "adapter_config.json").read_text())
    base = adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise InputError(f"{directory}/adapter_config.json names no base_model_name_or_path")
    base_dir, base_id, base_sha = _base_location(base, directory)
    record = directory / FINETUNE_RECORD
    if rope_theta is None and record.is_file():  # trained with a RoPE change: load it the same way
        rope_theta = json.loads(record.read_text()).get("rope_theta")
    hf_model, tokenizer = _load_hf(base_dir, dtype, rope_theta, n_ctx, **placement)
    try:
        merged = PeftModel.from_pretrained(hf_model, directory).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        first = next((ln for ln in lines if "mismatch" in ln), lines[0] if lines else repr(e))
        more = f" (+{len(lines) - 2} more)" if len(lines) > 2 else ""
        raise InputError(
            f"LoRA checkpoint {directory} does not fit its base {base}: {first}{more}. Was it "
            "trained on another base model?"
        ) from e
    if (directory / "tokenizer.json").is_file():
        tokenizer_dir = directory
    else:
        tokenizer_dir = base_dir
    return _boot(
        merged,
        tokenizer,
        tokenizer_dir,
        model_id=f"{base_id}+lora:{directory.name}",
        source=str(directory),
        sha=base_sha,
        dtype=dtype,
        device=device,
        lora=str(directory),
    )


def _base_location(base: str, adapter_dir: Path) -> tuple[Path, str, str | None]:
    embedded = resolve_embedded(base)
    if embedded is not None:
        d, sha = converted_dir(embedded)
        return d, embedded.name, sha
    if _is_gguf(base):
        d, sha = converted_gguf(base)
        return d, Path(base).name.removesuffix(".gguf"), sha
    candidate = Path(base).expanduser()
    if not candidate.is_absolute():
        candidate = (adapter_dir / candidate) if (adapter_dir / candidate).is_dir() else candidate
    if candidate.is_dir():
        return candidate.resolve(), candidate.name, _weights_sha(candidate)
    d = _from_hf_cache(base)
    return d, base, _weights_sha(d)


def model_config(name_or_path: str | os.PathLike = "smollm2-135m", *,
                 rope_theta: float | None = None):  # fmt: skip
    """The HF config of the model `load_model(name_or_path)` would load (a LoRA checkpoint: its
    base's), without reading any weights: for planning a run."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(_planned_directory(name_or_path), local_files_only=True)
    if rope_theta is not None:
        _set_rope_theta(config, rope_theta)
    return config


def model_tokenizer(name_or_path: str | os.PathLike = "smollm2-135m"):
    """The tokenizer `load_model(name_or_path)` would give the bridge, without its weights (a
    LoRA checkpoint: its base's): for planning a run from its prompts' real lengths."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_planned_directory(name_or_path), local_files_only=True)


def _planned_directory(name_or_path: str | os.PathLike) -> Path:
    """The HF directory whose config and tokenizer `load_model(name_or_path)` reads."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text())
        name = base.get("base_model_name_or_path") or name
        directory, _, _ = _base_location(name, path)
    else:
        directory, _, _ = _base_location(name, Path.cwd())
    if not (Path(directory) / "config.json").is_file():
        raise InputError(f"{directory} has no config.json: not an HF model directory")
    return Path(directory)


def _is_gguf(name: str) -> bool:
    path = Path(name).expanduser()
    if path.suffix.lower() != ".gguf":
        return False
    if not path.is_file():
        raise InputError(f"{path}: no such GGUF file")
    return True


def causal_lm_class(config, directory: Path | str = "the model") -> str:
    """The causal-LM class name transformers registers for `config.model_type` (for a config that
    lacks `architectures`), checked against what the TransformerLens bridge supports."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    fix = (f'add "architectures": ["<Class>ForCausalLM"] to {directory}/config.json, naming '
           "the class the weights were trained as")  # fmt: skip
    if not model_type:
        raise InputError(
            f"{directory}: config.json has neither `architectures` nor `model_type`; {fix}"
        )
    found = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    names = [found] if isinstance(found, str) else list(found or ())
    if len(names) != 1:
        what = f"several causal-LM classes ({', '.join(names)})" if names else "no causal-LM class"
        raise InputError(
            f"{directory}: config.json has no `architectures`, and transformers registers {what} "
            f"for model_type {model_type!r}; {fix}"
        )
    if names[0] not in _bridge_architectures():
        raise InputError(
            f"{directory}: config.json has no `architectures`; model_type {model_type!r} is "
            f"{names[0]}, which the TransformerLens bridge does not support"
        )
    return names[0]


def _bridge_architectures() -> frozenset[str]:
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    return frozenset(SUPPORTED_ARCHITECTURES)


def _from_hf_cache(name: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as e:
        raise InputError(
            f"unknown model {name!r}: not an embedded model ({', '.join(sorted(EMBEDDED))}), not "
            "a local directory, and not in the local Hugging Face cache (models are never "
            "downloaded). Pass a directory holding config.json and weights, or pre-populate the "
            "HF cache on a machine with hub access."
        ) from e


def _weights_sha(directory: Path) -> str | None:
    """Hash of the (first) weights file; None for sharded or missing weights."""
    single = directory / "model.safetensors"
    return file_sha256(single) if single.is_file() else None


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InputError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}") from None


def _rope_theta(config) -> float | None:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    theta = getattr(config, "rope_theta", None)
    return float(theta) if theta is not None else None


def _set_rope_theta(config, theta: float) -> None:
    if _rope_theta(config) is None:
        raise InputError(f"{config.model_type} has no RoPE theta to override")
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        config.rope_parameters = {**params, "rope_theta": float(theta)}
    if hasattr(config, "rope_theta"):
        config.rope_theta = float(theta)
