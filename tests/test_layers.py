"""batch.layers: the model's layers in fewer kernels. Each replacement computes transformers' and
peft's function with the same weights (float32 logits within rounding; bitwise where said), in the
number of ops counted here (OpCounter: ops the host dispatches, views left out)."""

import copy
import dataclasses

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaRotaryEmbedding

from batch import loading
from batch.bench.measuring import OpCounter
from batch.config import ModelConfig
from batch.layers import FoldedRotary, LoraLinear, PackedAttention, PackedDecoderLayer, PackedLinear, PackedMLP, fused_norms, lean_lora_layers
from batch.loading import load_model
from tests.conftest import TINY
from tests.test_loading import logits  # (the real tokens' logits of 8 prompts, left-padded)
from tests.test_exactness import prompts_40

GEMMS = ("mm", "addmm", "addmm_", "bmm")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY / "base")
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "left"
    return tokenizer


def forward_ops(model, tokenizer) -> OpCounter:
    enc = tokenizer(prompts_40()[:1], return_tensors="pt")
    with torch.no_grad(), OpCounter() as ops:
        model(**enc)
    return ops


def gemms(ops: OpCounter) -> int:
    return sum(ops.ops[name] for name in GEMMS)


def transformers_model(dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=dtype).eval()


def peft_reference(adapter=TINY / "adapter"):
    """The tiny model in float32 with its adapter as peft computes it: the model card's way."""
    from peft import PeftModel

    return PeftModel.from_pretrained(transformers_model(), str(adapter)).eval()


def test_lora_linear_is_peft_s_function_in_two_ops_more_than_its_base(tokenizer):
    """lean_lora_layers: each of peft's 14 LoRA layers a LoraLinear holding the same weights, base(x) +
    scaling * (x A^T) B^T as peft computes it up to float32 rounding, in two ops more than the base
    layer's (x A^T and one addmm) where peft's takes four (A, B, the scaling, the sum)."""
    reference = peft_reference()
    model = lean_lora_layers(peft_reference())
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 2 * 7 and not any("lora" in type(m).__module__ for m in model.modules())
    peft_q = reference.base_model.model.model.layers[0].self_attn.q_proj
    q = model.model.layers[0].self_attn.q_proj
    assert torch.equal(q.lora_A, peft_q.lora_A["default"].weight) and torch.equal(q.lora_B, peft_q.lora_B["default"].weight)
    assert q.scaling == peft_q.scaling["default"] != 1

    ours, theirs = logits(model, tokenizer), logits(reference, tokenizer)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()
    base = forward_ops(transformers_model(), tokenizer).total
    assert forward_ops(model, tokenizer).total - base == 2 * len(layers)
    assert forward_ops(reference, tokenizer).total - base == 4 * len(layers)


def _layer(out: int, inputs: int = 48, bias: bool = False, rank: int = 0, scaling: float = 0.5, dtype=torch.float32):
    linear = torch.nn.Linear(inputs, out, bias=bias, dtype=dtype)
    if not rank:
        return linear
    return LoraLinear(linear, torch.randn(rank, inputs, dtype=dtype), torch.randn(out, rank, dtype=dtype), scaling)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_linear_gives_its_layers_outputs_side_by_side(dtype):
    """Layers of other widths, one with a bias, two with adapters of other ranks and one without: the
    packed layer's output is the layers' outputs, concatenated, in two ops (one GEMM, one addmm in
    place) where the layers take eight."""
    torch.manual_seed(0)
    layers = [_layer(32, rank=4, dtype=dtype), _layer(16, bias=True, dtype=dtype), _layer(24, rank=2, dtype=dtype)]
    assert PackedLinear.packs(layers)
    packed = PackedLinear(layers)
    x = torch.randn(3, 5, 48, dtype=dtype)
    with torch.no_grad(), OpCounter() as alone:
        expected = torch.cat([layer(x) for layer in layers], dim=-1)
    with torch.no_grad(), OpCounter() as ops:
        out = packed(x)
    assert out.shape == (3, 5, 72) and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 0.1
    assert torch.allclose(out.float(), expected.float(), rtol=0, atol=tolerance), (out - expected).abs().max()
    assert gemms(ops) == 2 and gemms(alone) == 3 + 2 * 2, (ops.ops, alone.ops)
    merged = PackedLinear([_layer(32, dtype=dtype), _layer(16, dtype=dtype)])
    with torch.no_grad(), OpCounter() as ops:
        merged(x)
    assert gemms(ops) == 1 and merged.lora_B is None


def test_what_a_packed_linear_cannot_stack_is_refused():
    """Layers whose weights PackedLinear cannot stack: a 4-bit layer, adapters of two scalings, two
    dtypes, two input widths."""
    four_bit = bnb.nn.Linear4bit(48, 16, quant_type="nf4")
    assert not PackedLinear.packs([_layer(16), four_bit])
    assert not PackedLinear.packs([_layer(16, rank=2, scaling=0.5), _layer(16, rank=2, scaling=2.0)])
    assert not PackedLinear.packs([_layer(16), _layer(16, dtype=torch.bfloat16)])
    assert not PackedLinear.packs([_layer(16), _layer(16, inputs=32)])
    with torch.device("meta"):  # weights offloaded by accelerate: it restores them by their names
        assert not PackedLinear.packs([_layer(16), _layer(16)])
    assert PackedLinear.packs([_layer(16, rank=2), _layer(16)])


def test_grouped_kv_heads_biases_and_a_kv_cache():
    """What the tiny model does not have: 4 query heads over 2 kv heads, biases on every projection,
    an adapter of rank 3 (rows padded to 8 elements), and generation through transformers' own KV
    cache. A prefill and two decode steps give peft's logits (float32 rounding)."""
    from peft import LoraConfig, get_peft_model
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    from batch.layers import packed_projections

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    lora = LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      init_lora_weights=False)
    reference = get_peft_model(LlamaForCausalLM(config), lora).eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.1)  # (transformers initialises them to zeros)
    model = lean_lora_layers(copy.deepcopy(reference))
    assert torch.equal(model.model.layers[1].mlp.down_proj.lora_B, reference.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight)
    assert packed_projections(model) == 4
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.bias.abs().sum() > 0 and qkv.outputs == 64 + 2 * 32 and qkv.lora_B.shape[1] == 3 * 3 + 7  # 137 columns padded to 144
    ids = torch.randint(0, 128, (2, 7))
    caches = DynamicCache(config=config), DynamicCache(config=config)
    with torch.no_grad():
        for step in range(3):
            inputs = ids if step == 0 else ids[:, -1:]
            ours, theirs = (m(input_ids=inputs, past_key_values=c, use_cache=True).logits for m, c in zip((model, reference), caches))
            assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (step, (ours - theirs).abs().max())
            ids = torch.cat([ids, theirs[:, -1:].argmax(-1)], dim=1)


def test_each_module_s_weights_are_freed_before_the_next_is_packed(monkeypatch):
    """Packing holds one module's weights twice at most, not the model's (the 7B model's projections
    are 12 GiB in bf16): once layer 0's attention is packed, its unstacked q_proj weight is gone
    before the next module is."""
    import weakref

    from batch import layers

    model = transformers_model()
    first = weakref.ref(model.model.layers[0].self_attn.q_proj.weight)
    seen = []

    class Watched(PackedLinear):
        def __init__(self, group):
            seen.append(first() is None)
            super().__init__(group)

    monkeypatch.setattr(layers, "PackedLinear", Watched)
    assert layers.packed_projections(model) == 4
    assert seen == [False, False] + [True] * 6  # layer 0's attention (qkv, o), its MLP (gate-up, down); layer 1's


def unpacked(monkeypatch, cfg: ModelConfig, tokenizer):
    """load_model's model without packed projections (its norms are torch's all the same)."""
    with monkeypatch.context() as m:
        m.setattr(loading, "packed_projections", lambda model: 0)
        return load_model(cfg, tokenizer=tokenizer)[0]


NF4 = ModelConfig(base=str(TINY / "base"), adapter=str(TINY / "adapter"), quantization="nf4", compute_dtype="float32",
                  device_map="cpu", weights="dequantized")
PLAIN = ModelConfig(base=str(TINY / "base"), quantization="none", compute_dtype="float32", device_map="cpu")

# (the job's model, GEMMs a forward of the tiny model -- two layers and the head -- takes unpacked, packed)
PACKED_CASES = {
    "unquantized": (PLAIN, 2 * 7 + 1, 2 * 4 + 1),  # q k v o gate up down -> qkv o gate_up down
    "unquantized, adapter": (dataclasses.replace(PLAIN, adapter=str(TINY / "adapter")), 2 * 21 + 1, 2 * 8 + 1),  # (base, A, addmm) x 7 -> 2 x 4
    "nf4 dequantized, adapter": (NF4, 2 * 21 + 1, 2 * 8 + 1),
    "nf4, adapter merged": (dataclasses.replace(NF4, merge_adapter=True), 2 * 7 + 1, 2 * 4 + 1),
}


@pytest.mark.parametrize("case", PACKED_CASES)
def test_packed_projections_are_the_model_s_function_in_fewer_kernels(tokenizer, monkeypatch, case):
    """Every attention and MLP of a model whose projections are plain linear layers is packed: q, k and
    v one GEMM and gate and up one, each adapter's A inside its layer's GEMM and its B one addmm, the
    rotary embedding over q and k at once, and without an adapter the decoder layer's residual sums in
    o_proj's and down_proj's GEMMs. The logits are the unpacked model's up to float32 rounding; the
    GEMMs, the rotary embedding's kernels and the sums are counted."""
    cfg, before, after = PACKED_CASES[case]
    model, _ = load_model(cfg, tokenizer=tokenizer)
    reference = unpacked(monkeypatch, cfg, tokenizer)
    assert sum(isinstance(m, PackedAttention) for m in model.modules()) == 2 and sum(isinstance(m, PackedMLP) for m in model.modules()) == 2
    assert not any(isinstance(m, (LoraLinear, LlamaAttention, LlamaMLP, LlamaDecoderLayer)) for m in model.modules())
    assert sum(isinstance(m, PackedDecoderLayer) for m in model.modules()) == 2
    adapters = sum(isinstance(m, PackedLinear) and m.lora_B is not None for m in model.modules())
    assert adapters == (2 * 4 if cfg.adapter and not cfg.merge_adapter else 0)

    ours, theirs = logits(model, tokenizer), logits(reference, tokenizer)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()
    packed, plain = forward_ops(model, tokenizer), forward_ops(reference, tokenizer)
    assert (gemms(plain), gemms(packed)) == (before, after)
    sums = 0 if adapters else 2  # without an adapter, both residual sums a layer in o_proj's and down_proj's GEMM
    # transformers' rotary embedding takes mul 4, neg 2, cat 2, add 2 a layer; the folded one mul 2, cat 1
    # and add 1 a layer, and one mul a forward (FoldedRotary's sign)
    for name, fewer in (("mul", 2 * 2 - 1), ("neg", 2 * 2), ("cat", 2 * 1), ("add", 2 * (1 + sums))):
        assert plain.ops[name] - packed.ops[name] == fewer, (name, plain.ops[name], packed.ops[name])
    assert plain.total - packed.total == (before - after) + 2 * (6 + sums) - 1  # and no op more anywhere


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_the_folded_rotary_embedding_gives_the_unfolded_logits_bitwise(tokenizer, monkeypatch, compute_dtype):
    """With the rotary embedding's sin folded (FoldedRotary: rotate_half's sign once a forward), the
    packed model's logits are bitwise those of the same model unfolded, in float32 and in bf16 (the
    same products and sum; the sign is exact), in one op fewer a layer and one more a forward."""
    from batch import layers

    cfg = dataclasses.replace(NF4, compute_dtype=compute_dtype)
    folded = load_model(cfg, tokenizer=tokenizer)[0]
    assert type(folded.model.rotary_emb) is FoldedRotary and all(m.folded for m in folded.modules() if isinstance(m, PackedAttention))
    monkeypatch.setattr(layers, "fold_rotary", lambda model: False)
    unfolded = load_model(cfg, tokenizer=tokenizer)[0]
    assert type(unfolded.model.rotary_emb) is LlamaRotaryEmbedding and not any(getattr(m, "folded", False) for m in unfolded.modules())
    ours, theirs = logits(folded, tokenizer), logits(unfolded, tokenizer)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), (ours - theirs).abs().max()
    assert forward_ops(unfolded, tokenizer).total - forward_ops(folded, tokenizer).total == 2 - 1


def test_packed_projections_in_bfloat16_are_no_farther_from_float32(tokenizer, monkeypatch):
    """In bf16, the packed model's logits are as close to the float32 ones as the unpacked model's
    (2x the largest error, 1.5x the mean, as for the norms)."""
    cfg = dataclasses.replace(NF4, compute_dtype="bfloat16")
    exact = logits(load_model(NF4, tokenizer=tokenizer)[0], tokenizer)
    ours = logits(load_model(cfg, tokenizer=tokenizer)[0], tokenizer)
    theirs = logits(unpacked(monkeypatch, cfg, tokenizer), tokenizer)
    err, err_theirs = (ours - exact).abs(), (theirs - exact).abs()
    assert err.max() <= 2 * err_theirs.max() and err.mean() <= 1.5 * err_theirs.mean(), (err.max(), err_theirs.max(), err.mean(), err_theirs.mean())


def test_layers_that_do_not_pack_stay_as_they_are(tokenizer, tmp_path):
    """NF4-resident layers stay bitsandbytes' (and their attention and MLP transformers'); a LoRA variant
    (here DoRA on q and v) stays peft's and its attention transformers', while the MLP beside it, plain,
    is packed; the logits are peft's."""
    nf4, _ = load_model(dataclasses.replace(NF4, weights="nf4"), tokenizer=tokenizer)
    assert not any(isinstance(m, (PackedAttention, PackedMLP, PackedLinear)) for m in nf4.modules())
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in nf4.modules()) == 2 * 7
    assert type(nf4.model.rotary_emb) is LlamaRotaryEmbedding  # (its sin is transformers' attention's: not folded)

    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(transformers_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False))
    dora.save_pretrained(tmp_path / "dora")
    model, _ = load_model(dataclasses.replace(PLAIN, adapter=str(tmp_path / "dora")), tokenizer=tokenizer)
    q = model.model.layers[0].self_attn.q_proj
    assert type(q).__module__.startswith("peft.") and q.lora_variant and not any(isinstance(m, LoraLinear) for m in model.modules())
    assert type(model.model.layers[0].self_attn) is LlamaAttention and type(model.model.layers[0].mlp) is PackedMLP
    assert type(model.model.layers[0]) is LlamaDecoderLayer  # (its sums stay its own)
    assert type(model.model.rotary_emb) is LlamaRotaryEmbedding
    ours, theirs = logits(model, tokenizer), logits(peft_reference(tmp_path / "dora"), tokenizer)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_norms_are_torch_s_rms_norm_with_transformers_outputs(tokenizer, dtype):
    """fused_norms: every LlamaRMSNorm torch's nn.RMSNorm holding the same weight (one fused kernel on a
    GPU: the GPU test below): logits bitwise transformers' own in float32; in bf16 the same function
    with one rounding fewer, no farther from the float32 logits than transformers' bf16 ones (1.5x the
    mean error, 2x the largest, as for bitsandbytes' fused kernel in test_loading)."""
    model = transformers_model(dtype)
    fused_norms(model, dtype)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 2 * 2 + 1 and not any("RMSNorm" in type(m).__name__ and type(m) is not torch.nn.RMSNorm for m in model.modules())
    assert norms[0].weight.dtype == dtype
    ours, theirs = logits(model, tokenizer), logits(transformers_model(dtype), tokenizer)
    if dtype == torch.float32:
        assert torch.equal(ours, theirs)
    else:
        exact = logits(transformers_model(), tokenizer)
        err, err_theirs = (ours - exact).abs(), (theirs - exact).abs()
        assert err.max() <= 2 * err_theirs.max() and err.mean() <= 1.5 * err_theirs.mean(), (err.max(), err_theirs.max(), err.mean(), err_theirs.mean())


def test_load_model_uses_torch_s_norms_on_every_path(tokenizer):
    for cfg in (PLAIN, NF4, dataclasses.replace(NF4, weights="nf4"), dataclasses.replace(NF4, merge_adapter=True)):
        model, _ = load_model(cfg, tokenizer=tokenizer)
        assert sum(type(m) is torch.nn.RMSNorm for m in model.modules()) == 2 * 2 + 1, cfg


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_a_norm_is_one_kernel():
    """What fused_norms is for: on a GPU torch's rms_norm is one op (its fused kernel), transformers'
    LlamaRMSNorm six or more, at the 7B model's width in bf16."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(128, 1, 4096, device="cuda", dtype=torch.bfloat16)
    theirs = LlamaRMSNorm(4096, eps=1e-5).to("cuda", torch.bfloat16)
    ours = torch.nn.RMSNorm(4096, eps=1e-5, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), OpCounter() as fused:
        ours(x)
    with torch.no_grad(), OpCounter() as plain:
        theirs(x)
    assert fused.total == 1 and plain.total >= 6, (fused.ops, plain.ops)
    assert torch.allclose(ours(x).float(), theirs(x).float(), atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_packed_q_k_v_with_adapters_launch_fewer_kernels():
    """At the 7B model's widths in bf16, q, k and v with rank-8 adapters: the packed layer's output is
    the three LoraLinears' (bf16 rounding), and it launches fewer CUDA kernels (the profiler's count:
    its addmm writes in place into the GEMM's output, no copy)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    layers = [_layer(4096, inputs=4096, rank=8, scaling=2.0, dtype=torch.bfloat16).cuda() for _ in range(3)]
    packed = PackedLinear(layers)
    x = torch.randn(64, 1, 4096, device="cuda", dtype=torch.bfloat16) / 64

    def kernels(run) -> int:
        with torch.no_grad():
            run()  # warm: cuBLAS's handles and workspaces
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
        return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")

    with torch.no_grad():
        expected = torch.cat([layer(x) for layer in layers], dim=-1)
        out = packed(x)
    assert torch.allclose(out.float(), expected.float(), atol=0.05, rtol=0.02), (out - expected).abs().max()
    ours, theirs = kernels(lambda: packed(x)), kernels(lambda: [layer(x) for layer in layers])
    assert ours <= 3 and ours < theirs, (ours, theirs)
