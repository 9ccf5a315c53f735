"""model.weights: the NF4 layers dequantized once are bitsandbytes' own dequantized values, the LoRA
adapter stays unmerged (peft's function, in two kernels a layer), and the outputs equal the NF4 model's (bitwise where bitsandbytes
dequantizes and multiplies: float32 on every CPU, bfloat16 without its fused AVX512-BF16 kernel);
the log line says which weights and why."""

import json

import bitsandbytes as bnb
import pytest
import torch

from batch import loading
from batch.config import GenerationSettings, ModelConfig
from batch.engine import Engine
from batch.layers import LoraLinear
from batch.loading import dequantize_model, load_model
from tests.conftest import TINY
from batch.plan import plan_batches
from tests.test_exactness import MAX_NEW, prompts_40


def config(weights: str, dtype: str = "float32", merge: bool = False) -> ModelConfig:
    return ModelConfig(base=str(TINY / "base"), adapter=str(TINY / "adapter"), quantization="nf4",
                       compute_dtype=dtype, device_map="cpu", weights=weights, merge_adapter=merge)


@pytest.fixture(scope="module")
def tokenizer():
    return load_model(config("nf4"))[1]


def test_dequantized_weights_are_dequantize_4bit_of_the_nf4_weights(tokenizer):
    model, _ = load_model(config("nf4"), tokenizer=tokenizer)
    expected = {name: bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).to(torch.float32)
                for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert all(name.endswith("_proj.base_layer") for name in expected)
    assert len(expected) == 2 * 7  # two layers, seven projections each
    dequantize_model(model, torch.float32)
    modules = dict(model.named_modules())
    for name, weight in expected.items():
        dense = modules[name]
        assert type(dense) is torch.nn.Linear and dense.weight.dtype == torch.float32
        assert torch.equal(dense.weight, weight), name
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    # the adapter is still unmerged, around the dense layer
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is LoraLinear and q.base_layer is modules["model.layers.0.self_attn.q_proj.base_layer"]
    assert getattr(model, "hf_quantizer", None) is None  # an ordinary model now


def fused_kernel_used(model) -> bool:
    """Whether bitsandbytes ran the model's NF4 layers through its fused AVX512-BF16 CPU kernel (the
    weights repacked on the first forward, activations cast to bfloat16) rather than dequantize +
    matmul: what it did, read from the layers' quantization state after a forward."""
    used = {getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(used) == 1, used  # one choice for every layer
    return used.pop()


def logits(model, tokenizer) -> torch.Tensor:
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts_40()[:8], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits[enc["attention_mask"].bool()].float()  # the real tokens' logits


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dequantized_logits_equal_nf4_logits(tokenizer, dtype):
    """The contract on every CPU: in float32 NF4-resident logits are bitwise the dequantized ones (the
    job turns bitsandbytes' fused bf16 kernel off: float32 means float32); in bfloat16 they are
    bitwise equal where bitsandbytes computes a 4-bit layer as dequantize + matmul -- its choice on
    CPUs without AVX512-BF16 (bitsandbytes.functional.has_avx512bf16() false), and forced here on any
    CPU -- and where it uses its fused AVX512-BF16 kernel (Zen 4, Sapphire Rapids and later) they are
    the same function in other bf16 rounding: no farther from the float32 logits than the dequantized
    bf16 ones are (twice their largest error, 1.5x their mean)."""
    dense = logits(load_model(config("dequantized", dtype), tokenizer=tokenizer)[0], tokenizer)
    nf4, _ = load_model(config("nf4", dtype), tokenizer=tokenizer)
    resident = logits(nf4, tokenizer)
    fused = fused_kernel_used(nf4)
    assert fused == (dtype == "bfloat16" and bool(bnb.functional.has_avx512bf16()))  # bitsandbytes' own test of the CPU
    if not fused:
        assert torch.equal(resident, dense)
    else:
        exact = logits(load_model(config("dequantized", "float32"), tokenizer=tokenizer)[0], tokenizer)
        err, err_dense = (resident - exact).abs(), (dense - exact).abs()
        assert not torch.equal(resident, dense)
        assert err.max() <= 2 * err_dense.max() and err.mean() <= 1.5 * err_dense.mean(), (err.max(), err_dense.max(), err.mean(), err_dense.mean())
    # dequantize + matmul, bitsandbytes' path on every CPU with its fused kernel off: bitwise in any dtype
    nf4, _ = load_model(config("nf4", dtype), tokenizer=tokenizer)
    for m in nf4.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    assert torch.equal(logits(nf4, tokenizer), dense) and not fused_kernel_used(nf4)


def test_dequantized_greedy_outputs_equal_nf4(tokenizer):
    settings = GenerationSettings(max_new_tokens=MAX_NEW, do_sample=False)
    nf4 = Engine(*load_model(config("nf4"), tokenizer=tokenizer), settings)
    dense = Engine(*load_model(config("dequantized"), tokenizer=tokenizer), settings)
    ids = nf4.tokenize(prompts_40())  # the model card's nine questions and 31 more

    def batched(engine):  # sorted, left-padded batches of 8: (response, finish reason, tokens) per prompt
        out = [None] * len(ids)
        for batch in plan_batches([len(i) for i in ids], MAX_NEW, 8, 10**6):
            for row, c in zip(batch, engine.generate([ids[r] for r in batch], [0] * len(batch))):
                out[row] = (c.response, c.finish_reason, c.completion_tokens)
        return out

    out = batched(dense)
    assert out == batched(nf4)
    assert {"stop", "length"} <= {reason for _, reason, _ in out}  # answers that stop, and longer ones


def test_the_log_line_says_which_weights_and_why(tokenizer, capsys, monkeypatch):
    load_model(config("auto"), tokenizer=tokenizer)
    line = capsys.readouterr().err.strip()
    assert line.startswith("komt-batch: weights: dequantized to float32, ") and "MiB, NF4 was " in line
    assert "model.weights: auto: dequantized they take" in line and "at least 50% kept for the KV cache on the CPU" in line

    load_model(config("nf4"), tokenizer=tokenizer)
    assert capsys.readouterr().err.strip().endswith("MiB (model.weights: nf4)")

    monkeypatch.setattr(loading, "free_memory", lambda device: (3 * 2**19, "a small device"))  # 1.5 MiB
    model, _ = load_model(config("auto"), tokenizer=tokenizer)
    line = capsys.readouterr().err.strip()
    assert line.startswith("komt-batch: weights: NF4 resident, ") and "under 50% kept for the KV cache on a small device" in line
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_unquantized_models_are_left_alone(tokenizer, capsys):
    model, _ = load_model(ModelConfig(base=str(TINY / "base"), quantization="none", compute_dtype="float32",
                                      device_map="cpu", weights="dequantized"), tokenizer=tokenizer)
    assert capsys.readouterr().err == ""
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert all(type(m.weight) is torch.nn.Parameter and m.weight.dtype == torch.float32 for m in model.modules() if hasattr(m, "weight"))


def test_a_merged_adapter_is_folded_into_the_dequantized_weights(tokenizer, capsys):
    """model.merge_adapter: W + scaling * B @ A in one plain linear layer per projection (the NF4
    weights dequantized first, whatever model.weights says), no LoRA layer left; the logits are the
    unmerged adapter's up to rounding."""
    from safetensors.torch import load_file

    merged, _ = load_model(config("auto", merge=True), tokenizer=tokenizer)
    line = capsys.readouterr().err.strip()
    assert line.startswith("komt-batch: weights: dequantized to float32, ") and line.endswith("(model.merge_adapter), LoRA adapter merged into them")
    assert not any("lora" in name for name, _ in merged.named_modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())

    nf4, _ = load_model(config("nf4"), tokenizer=tokenizer)
    base = nf4.model.layers[1].mlp.down_proj.base_layer
    adapter = load_file(str(TINY / "adapter" / "adapter_model.safetensors"))
    a, b = (adapter[f"base_model.model.model.layers.1.mlp.down_proj.lora_{x}.weight"] for x in "AB")
    peft = json.loads((TINY / "adapter" / "adapter_config.json").read_text())
    scaling = peft["lora_alpha"] / peft["r"]
    expected = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state) + scaling * b @ a
    assert torch.allclose(merged.model.layers[1].mlp.down_proj.weight, expected, atol=1e-6)

    unmerged, _ = load_model(config("dequantized"), tokenizer=tokenizer)
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts_40()[:8], return_tensors="pt", padding=True)
    with torch.no_grad():
        a, b = unmerged(**enc).logits, merged(**enc).logits
    assert not torch.equal(a, b) and torch.allclose(a, b, atol=1e-4)  # other rounding, the same function


def test_merged_and_unmerged_adapters_agree_on_the_greedy_answers(tokenizer):
    """The agreement the README reports for the tiny model (40 prompts, greedy, float32)."""
    settings = GenerationSettings(max_new_tokens=MAX_NEW, do_sample=False)
    unmerged = Engine(*load_model(config("dequantized"), tokenizer=tokenizer), settings)
    merged = Engine(*load_model(config("dequantized", merge=True), tokenizer=tokenizer), settings)
    ids = unmerged.tokenize(prompts_40())
    same = [a.response == b.response for a, b in zip(unmerged.generate(ids, [0] * len(ids)), merged.generate(ids, [0] * len(ids)))]
    print(f"merged == unmerged on {sum(same)} of {len(same)} greedy answers")
    assert sum(same) >= 38


class _MatmulDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """The dtypes of every matrix product a forward runs (aten.mm / addmm / bmm / linear)."""

    OPS = {"mm", "addmm", "bmm", "linear", "matmul"}

    def __init__(self):
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.OPS:
            self.seen.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("weights", ["dequantized", "nf4"])
def test_the_unmerged_adapter_computes_in_the_compute_dtype(tokenizer, weights):
    """With bf16 compute, peft's default (float32 adapter weights, float32 LoRA GEMMs beside the base's
    bf16 ones: seen on the H200's profile) is not what runs: the adapter's weights and every matrix
    product of a forward are bf16. A merged adapter is still folded in float32 (peft's merge)."""
    model, _ = load_model(config(weights, "bfloat16"), tokenizer=tokenizer)
    lora = {name: w.dtype for name, w in model.named_parameters() if ".lora_" in name}
    # NF4 resident: 7 LoraLinears a layer, A and B each; dequantized: 4 packed layers a layer, each
    # adapter's A stacked in its layer's weight (bf16: the set of all dtypes below)
    assert len(lora) == (2 * 7 * 2 if weights == "nf4" else 2 * 4) and set(lora.values()) == {torch.bfloat16}
    assert {w.dtype for w in model.parameters() if w.is_floating_point()} == {torch.bfloat16}
    enc = tokenizer(prompts_40()[:2], return_tensors="pt", padding=True)
    with torch.no_grad(), _MatmulDtypes() as products:
        model(**enc)
    assert products.seen and torch.float32 not in products.seen, products.seen


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_nf4_run_prints_only_its_own_lines(tmp_path, dtype):
    """A real NF4 run, with the NF4 layers resident: no line from bitsandbytes, the kernels package or
    transformers (on CPUs with AVX512-BF16 bitsandbytes tries to fetch a Hub kernel when imported, and
    they said so mid-log); the job says once which kernel bitsandbytes uses where it matters -- its
    fused AVX512-BF16 kernel in bfloat16 compute -- and nothing about it otherwise."""
    from tests.conftest import input_rows, komt, make_job, write_jsonl

    src = write_jsonl(tmp_path / "in.jsonl", input_rows(4, "n", " 더", 3))
    job = make_job(tmp_path, src, model={"compute_dtype": dtype, "weights": "nf4"}, generation={"max_new_tokens": 8})
    p = komt("run", job, "--no-progress")
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert lines and all(line.startswith("komt-batch: ") for line in lines), lines
    kernel = [line for line in lines if line.startswith("komt-batch: bitsandbytes: ")]
    fused = dtype == "bfloat16" and bool(bnb.functional.has_avx512bf16())
    assert kernel == (["komt-batch: bitsandbytes: NF4 layers computed by its fused AVX512-BF16 CPU kernel, activations in bfloat16: "
                       "the kernel built into bitsandbytes (its optional Hub kernel is not used)"] if fused else [])


def test_the_bench_says_nothing_of_bitsandbytes_hub_kernel():
    """`komt-batch bench` reads peft's version (machine_info) before it loads a model, and importing
    peft imports bitsandbytes: the quieting of bitsandbytes' Hub-kernel notice (batch.loading) must
    come first there too, or the notice lands in the bench's log (on CPUs with AVX512-BF16, where
    bitsandbytes tries the Hub kernel; elsewhere nothing is said either way)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = "import batch.bench; from batch.bench.measuring import machine_info; machine_info('cpu')"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stderr == "", p.stderr
