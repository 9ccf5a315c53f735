"""Loading the model as the model card does: the tokenizer, the base in 4-bit NF4 (bitsandbytes,
double quant) or as configured, and the PEFT LoRA adapter; then, where memory allows, the 4-bit
weights dequantized once (model.weights); the checks that run before any weight is read (paths, the
adapter's shapes against the base's layers)."""

from __future__ import annotations

import json
import logging
import re
import sys
import warnings
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
)
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from transformers.utils import logging as hf_logging

from batch.config import ModelConfig
from batch.errors import JobError, first_line
from batch.layers import fused_norms, lean_lora_layers, packed_projections
from batch.memory import dequantizing_fits, free_memory, size

# Keep the job's log readable: no per-tensor loading bar, no deprecation chatter from peft, and none
# of bitsandbytes' or the kernels package's notices about the optional Hub kernel that bitsandbytes
# tries to fetch when it is imported on CPUs with AVX512-BF16 (it falls back to its own kernel; the
# job says once which kernel runs, `cpu_kernel_line`). Set before bitsandbytes is imported: transformers
# imports it when this module loads a quantized model.
hf_logging.disable_progress_bar()
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
logging.getLogger("kernels").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def quantization_config(cfg: ModelConfig) -> BitsAndBytesConfig | None:
    if cfg.quantization == "nf4":  # the model card's setup: 4-bit NF4, double quant
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
        )
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(cfg: ModelConfig, where: str = "<job>"):
    """The tokenizer and the model's context length, without loading the weights (for planning)."""
    _check_paths(cfg, where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.base, trust_remote_code=cfg.trust_remote_code)
        config = AutoConfig.from_pretrained(cfg.base, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        if _looks_local(cfg.base):
            raise JobError(f"{where}: model.base: cannot load the tokenizer of {cfg.base}: {first_line(e)}") from None
        # an `org/name` that is not here: read as a Hub id, which neither the Hub nor its cache has
        # (`models/typo`, under a folder in the current directory, is more likely a local path mistyped)
        folder = cfg.base.split("/")[0]
        local = f"no such directory (./{folder} is a folder here), and " if Path(folder).is_dir() else "not a local directory, and "
        raise JobError(f"{where}: model.base: {cfg.base}: {local}not found as a Hugging Face Hub id: {first_line(e)}") from None
    check_weights_there(cfg, where)
    if cfg.adapter and Path(cfg.adapter).is_dir():
        check_adapter_fits(config, cfg.adapter, where)
    context = getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length
    # the job measures every prompt against the context itself (input.too_long): the tokenizer's own
    # warning about a long prompt ("Token indices sequence length is longer than ...") would only repeat it
    tokenizer.model_max_length = VERY_LARGE_INTEGER
    return tokenizer, int(context)


def check_weights_there(cfg: ModelConfig, where: str) -> None:
    """Local model folders hold what loading reads: the base its weights (each safetensors file's
    header readable, an index's files there), the adapter a config peft reads and its weights.
    Else loading would fail only after the plan is stored (run) or not at all (validate)."""
    from peft import PeftConfig
    from peft.utils import SAFETENSORS_WEIGHTS_NAME as ADAPTER_SAFETENSORS
    from peft.utils import WEIGHTS_NAME as ADAPTER_WEIGHTS
    from safetensors import safe_open

    base = Path(cfg.base).expanduser()
    if base.is_dir():
        names = [SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME]
        found = next((base / n for n in names if (base / n).is_file()), None)
        if found is None:
            raise JobError(f"{where}: model.base: {cfg.base} holds no weights ({', '.join(names)})")
        files = [found]
        if found.name.endswith(".index.json"):
            try:
                files = [base / f for f in sorted(set(json.loads(found.read_text())["weight_map"].values()))]
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise JobError(f"{where}: model.base: {found}: not a readable weights index ({first_line(e)})") from None
            if missing := [f.name for f in files if not f.is_file()]:
                raise JobError(f"{where}: model.base: {found.name} names weights files that are not in {cfg.base}: {', '.join(missing[:3])}")
        for f in files:
            if f.suffix == ".safetensors":
                try:
                    with safe_open(str(f), "pt"):  # (the header only)
                        pass
                except Exception as e:  # (safetensors raises its own SafetensorError, or OSError)
                    raise JobError(f"{where}: model.base: {f}: not a readable safetensors file ({first_line(e)})") from None
    adapter = Path(cfg.adapter).expanduser() if cfg.adapter else None
    if adapter is not None and adapter.is_dir():
        try:
            PeftConfig.from_pretrained(str(adapter))
        except (OSError, ValueError, TypeError) as e:  # (ValueError: no adapter_config.json, or not JSON)
            raise JobError(f"{where}: model.adapter: cannot load {cfg.adapter}: {first_line(e)}") from None
        names = [ADAPTER_SAFETENSORS, ADAPTER_WEIGHTS]
        if not any((adapter / n).is_file() for n in names):
            raise JobError(f"{where}: model.adapter: {cfg.adapter} holds no adapter weights ({', '.join(names)})")


def check_adapter_fits(config, adapter: str, where: str) -> None:
    """Compare the adapter's LoRA weight shapes with the base's layers, before any weight is loaded.

    peft would otherwise fail deep inside with a size-mismatch traceback (or not at all, for a
    missing layer). The base is built on the meta device: shapes only, no memory."""
    from safetensors import safe_open

    weights = Path(adapter) / "adapter_model.safetensors"
    if not weights.exists():
        return
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    modules = dict(base.named_modules())
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            name, _, kind = key.rpartition(".lora_")
            name = name.removeprefix("base_model.model.")
            layer = modules.get(name)
            shape = tuple(f.get_slice(key).get_shape())
            if layer is None or not hasattr(layer, "in_features"):
                problem = f"the base has no layer {name}"
            elif kind.startswith("A") and shape[-1] != layer.in_features:
                problem = f"{name} takes {layer.in_features} inputs, the adapter's lora_A expects {shape[-1]}"
            elif kind.startswith("B") and shape[0] != layer.out_features:
                problem = f"{name} gives {layer.out_features} outputs, the adapter's lora_B expects {shape[0]}"
            else:
                continue
            trained_on = _adapter_base(adapter)
            raise JobError(
                f"{where}: model.adapter: {adapter} does not fit model.base ({problem})"
                + (f"; it was trained on {trained_on}" if trained_on else "")
            )


def _check_paths(cfg: ModelConfig, where: str) -> None:
    for key, name in (("model.base", cfg.base), ("model.adapter", cfg.adapter)):
        if name and _looks_local(name) and not Path(name).expanduser().exists():
            raise JobError(f"{where}: {key}: {name}: no such directory")
    _check_device(cfg.device_map, where)


def _check_device(device_map: str, where: str) -> None:
    """A GPU that device_map names must be there (else torch fails deep in loading, after the plan is stored)."""
    m = re.fullmatch(r"(?:cuda(?::(\d+))?|(\d+))", str(device_map).strip())
    if not m:
        return
    index = int(m.group(1) or m.group(2) or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        sees = f"torch sees {count} CUDA device{'s' if count != 1 else ''}" if count else "torch sees no CUDA device here"
        raise JobError(f"{where}: model.device_map: {device_map}: {sees} (device_map: auto uses what there is)")


def _looks_local(name: str) -> bool:
    """A path, not a Hub id (`org/name`): it exists, starts like a path, or has not one `/`."""
    return Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") != 1


def load_model(cfg: ModelConfig, where: str = "<job>", tokenizer=None):
    """Model (base, quantized as configured, with the LoRA adapter applied) and tokenizer (loaded
    here unless the caller has it already)."""
    _check_paths(cfg, where)
    dtype = DTYPES[cfg.compute_dtype]
    try:
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.base, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            cfg.base,
            quantization_config=quantization_config(cfg),
            dtype=dtype,
            device_map=cfg.device_map,
            trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError) as e:
        raise JobError(f"{where}: model.base: cannot load {cfg.base}: {first_line(e)}") from None
    if cfg.quantization == "nf4" and dtype == torch.float32:
        honour_float32_compute(model)
    if cfg.merge_adapter:
        model = merged_model(model, cfg, where)
    else:
        if cfg.adapter:
            model = _apply_adapter(model, cfg.adapter, where, dtype)
        if cfg.quantization == "nf4":
            print(f"komt-batch: {choose_weights(model, cfg.weights, dtype)}", file=sys.stderr, flush=True)
            if line := cpu_kernel_line(model):
                print(f"komt-batch: {line}", file=sys.stderr, flush=True)
    packed_projections(model)
    fused_norms(model, dtype)
    model.eval()
    return model, tokenizer


def merged_model(model, cfg: ModelConfig, where: str):
    """model.merge_adapter: the base's NF4 layers dequantized once (whatever model.weights says:
    4-bit weights cannot take the adapter), then the adapter loaded onto the plain linear layers and
    merged by peft (`merge_and_unload`: W + scaling * B @ A, in float32 where the weights are in
    half precision). A step then costs what the base model's does; the outputs are those of the same
    function with other rounding (the README gives the agreement measured with the unmerged adapter)."""
    dtype = DTYPES[cfg.compute_dtype]
    line = choose_weights(model, "dequantized", dtype, "model.merge_adapter") if cfg.quantization == "nf4" else f"weights: {cfg.compute_dtype}"
    model = _apply_adapter(model, cfg.adapter, where).merge_and_unload()
    print(f"komt-batch: {line}, LoRA adapter merged into them", file=sys.stderr, flush=True)
    return model.eval()


def choose_weights(model, weights: str, dtype: torch.dtype, why: str | None = None) -> str:
    """Apply model.weights to a model loaded in NF4 (with or without its adapter): `nf4` keeps the
    4-bit layers, `dequantized` dequantizes them once, `auto` dequantizes when that leaves the KV
    cache at least half the free memory it would have beside the 4-bit weights (memory.py). Returns
    the log line: which was used and why (`why`, else the setting), with the sizes."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    nf4 = sum(nf4_bytes(m) for m in layers)
    dense = sum(m.out_features * m.in_features * dtype.itemsize for m in layers)
    if weights == "auto":
        free, where = free_memory(next(model.parameters()).device)
        dequantize, why = dequantizing_fits(free, nf4, dense)
        why = f"model.weights: auto: {why} on {where}"
    else:
        dequantize, why = weights == "dequantized", why or f"model.weights: {weights}"
    if not dequantize:
        return f"weights: NF4 resident, {size(nf4)} ({why})"
    dequantize_model(model, dtype)
    return f"weights: dequantized to {str(dtype).removeprefix('torch.')}, {size(dense)}, NF4 was {size(nf4)} ({why})"


def nf4_bytes(layer) -> int:
    """A 4-bit layer's storage: the packed weight and its quantization state (absmax, nested too)."""
    state = layer.weight.quant_state
    tensors = [layer.weight.data, state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


@torch.no_grad()
def dequantize_model(model, dtype: torch.dtype) -> None:
    """Replace every bitsandbytes 4-bit layer by an nn.Linear holding its weight dequantized once,
    `bitsandbytes.functional.dequantize_4bit`, in `dtype`: the values bitsandbytes' batched path
    (dequantize, then F.linear) multiplies by, so outputs equal that path. The 4-bit storage is freed
    layer by layer.

    A 4-bit layer inside an adapter's layer (LoraLinear, or peft's for a LoRA variant) keeps it: only
    the base layer is swapped, so the adapter stays unmerged and is computed as it is around the
    4-bit layer."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            if not isinstance(layer, bnb.nn.Linear4bit):
                continue
            weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
            dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            dense.weight = torch.nn.Parameter(weight.reshape(layer.out_features, layer.in_features), requires_grad=False)
            if layer.bias is not None:
                dense.bias = torch.nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
            setattr(parent, name, dense)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "hf_quantizer", None) is not None:  # what transformers' model.dequantize() leaves
        base.hf_quantizer.remove_quantization_config(base)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the 4-bit storage back, so the KV cache can be sized into it


def cpu_kernel_line(model) -> str | None:
    """Where bitsandbytes will run NF4-resident layers on the CPU through its fused AVX512-BF16
    kernel rather than dequantize + matmul (its own per-layer switch, set from the CPU; the job turns
    it off for float32 compute): a line that says so, and which kernel -- the Hub's, when bitsandbytes
    could fetch it at import, else the one in its own library. None where it dequantizes + multiplies."""
    import bitsandbytes as bnb

    fused = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False)
             and m.weight.device.type == "cpu"]
    if not fused:
        return None
    from bitsandbytes.backends.cpu import ops

    hub = getattr(ops, "gemm_4bit_forward_kernel", None) is not None
    which = "the Hub's kernels-community kernel" if hub else "the kernel built into bitsandbytes (its optional Hub kernel is not used)"
    return f"bitsandbytes: NF4 layers computed by its fused AVX512-BF16 CPU kernel, activations in bfloat16: {which}"


def honour_float32_compute(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes runs 4-bit layers through a fused kernel that casts the
    activations to bfloat16 whatever bnb_4bit_compute_dtype says. With float32 compute asked for, turn
    that kernel off (dequantize + float32 matmul), so float32 means float32: rows then compute the
    same alone or in a batch (the exactness test), instead of differing by bf16 rounding."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _apply_adapter(model, adapter: str, where: str, dtype: torch.dtype | None = None):
    """The LoRA adapter around the base's layers. Unmerged (`dtype` given), its weights are held in the
    compute dtype: peft would otherwise upcast them to float32 and run every step's adapter GEMMs in
    float32 beside the base's bf16 ones (seen on the H200 as sm80 f32 GEMMs). Merged (no `dtype`),
    peft keeps them in float32 and folds them in float32."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=dtype is None)
        if dtype is not None:
            for name, weight in model.named_parameters():
                if ".lora_" in name:
                    weight.data = weight.data.to(dtype)
            return lean_lora_layers(model)
        return model
    except (OSError, ValueError, TypeError) as e:  # (TypeError: a malformed adapter_config.json, e.g. "r": "x")
        raise JobError(f"{where}: model.adapter: cannot load {adapter}: {first_line(e)}") from None
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        base = _adapter_base(adapter)
        raise JobError(
            f"{where}: model.adapter: {adapter} does not fit model.base (its weights' shapes differ"
            + (f"; it was trained on {base}" if base else "")
            + ")"
        ) from None


def _adapter_base(adapter: str) -> str | None:
    try:
        return json.loads((Path(adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None

