"""The model's layers as the job runs them: the same weights and the same function as transformers'
and peft's layers, in fewer kernels. On a GPU every kernel of a forward is a launch the host issues
(the H200 profile of 2026-12-04: prefill host-bound, one core at 100%), so each one saved is host time
saved in every prefill forward and every decode step. load_model applies them where they fit; any
layer they do not fit (4-bit, a LoRA variant, another architecture) stays as it was.

- LoraLinear: an unmerged adapter's layer in three kernels, where peft's takes five or six;
- PackedLinear: layers that read one input (q, k, v; gate, up) as one GEMM, their adapters' A below
  the weights, and one addmm for every adapter's B;
- PackedAttention, PackedMLP: Llama's attention and MLP over packed projections, the rotary embedding
  applied to q and k at once, in four kernels (FoldedRotary: rotate_half's sign in the sin, once a
  forward);
- PackedDecoderLayer: Llama's decoder layer over them, its residual sums in o_proj's and down_proj's
  GEMMs where they have no adapter (merged);
- torch's nn.RMSNorm for transformers' LlamaRMSNorm."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    eager_attention_forward,
    rotate_half,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


class LoraLinear(torch.nn.Module):
    """A linear layer and its LoRA adapter, unmerged, for generating: base(x) + scaling * (x A^T) B^T
    in three kernels -- the base's product, x A^T, and one addmm that multiplies by B, scales and adds
    the base's output in its epilogue. peft's layer, written for training too, spends five (six around
    a 4-bit layer, whose output it clones for backprop): the base's, A's and B's products, the
    scaling, the sum, each a launch of its own in every step on a GPU, for each of the 7B model's 224
    LoRA layers. The rounding differs from peft's in its last bits (one rounding of the sum, where
    peft rounds B's product, its scaling and the sum): the same function, like the merged adapter."""

    def __init__(self, base_layer: torch.nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float):
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = torch.nn.Parameter(lora_A, requires_grad=False)  # [r, in]
        self.lora_B = torch.nn.Parameter(lora_B, requires_grad=False)  # [out, r]
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        h = torch.nn.functional.linear(x, self.lora_A)
        return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), self.lora_B.t(), alpha=self.scaling).view(out.shape)


def lean_lora_layers(model):
    """The model under a PeftModel with each of peft's plain LoRA layers (one adapter, no dropout
    at inference, no DoRA or other variant, no LoRA bias) replaced by a LoraLinear around the same
    base layer, holding the same weights; any other layer stays peft's. Returns the transformers
    model (what peft's merge_and_unload returns too)."""
    from peft.tuners.lora import LoraLayer

    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            if not isinstance(layer, LoraLayer) or layer.merged or layer.disable_adapters:
                continue
            (adapter,) = layer.active_adapters
            plain = (set(layer.lora_A) == {adapter} and not layer.lora_variant and not layer.lora_bias.get(adapter)
                     and isinstance(layer.lora_A[adapter], torch.nn.Linear) and not layer.lora_embedding_A)
            if plain:
                setattr(parent, name, LoraLinear(layer.base_layer, layer.lora_A[adapter].weight.data,
                                                 layer.lora_B[adapter].weight.data, layer.scaling[adapter]))
    return model.get_base_model()


class PackedLinear(torch.nn.Module):
    """Linear layers that read one input, as one: their weights stacked, with their adapters' A matrices
    (LoraLinear's) below them, so that one GEMM gives every layer's output and every x A^T; then one
    addmm, in place, adds scaling * (x A^T) B^T (B block-diagonal: each adapter's B in its layer's rows).
    Two kernels for q, k and v with their adapters, where three LoraLinears take nine; one without an
    adapter (merged), where three take three. Returns [..., the layers' outputs side by side] (a view,
    with adapters). The adapters must share one scaling (`packs`)."""

    def __init__(self, layers: list[torch.nn.Module]):
        super().__init__()
        bases = [layer.base_layer if isinstance(layer, LoraLinear) else layer for layer in layers]
        adapters = [layer for layer in layers if isinstance(layer, LoraLinear)]
        self.outputs = sum(base.out_features for base in bases)
        rank = sum(adapter.lora_A.shape[0] for adapter in adapters)
        pad = -(self.outputs + rank) % 8 if adapters else 0  # rows of 8 elements' multiple: cuBLAS's aligned kernels
        rank += pad
        some = bases[0].weight
        stacked = [base.weight for base in bases] + [adapter.lora_A for adapter in adapters] + ([some.new_zeros(pad, some.shape[1])] if pad else [])
        weight = torch.cat(stacked) if len(stacked) > 1 else some  # (one plain layer: its own weight, not a copy)
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None
        if any(base.bias is not None for base in bases):
            biases = [base.bias if base.bias is not None else weight.new_zeros(base.out_features) for base in bases]
            self.bias = torch.nn.Parameter(torch.cat(biases + [weight.new_zeros(rank)]), requires_grad=False)
        self.lora_B = None
        self.scaling = adapters[0].scaling if adapters else 1.0
        if adapters:
            lora_B = weight.new_zeros(self.outputs, rank)
            row = column = 0
            for layer, base in zip(layers, bases):
                if isinstance(layer, LoraLinear):
                    r = layer.lora_A.shape[0]
                    lora_B[row : row + base.out_features, column : column + r] = layer.lora_B
                    column += r
                row += base.out_features
            self.lora_B = torch.nn.Parameter(lora_B, requires_grad=False)

    @staticmethod
    def packs(layers: list[torch.nn.Module]) -> bool:
        """Plain linear layers (or LoraLinears around them), on one device in one dtype, with one input
        width and, where adapted, one scaling: what PackedLinear can stack."""
        weights, inputs = [], set()
        for layer in layers:
            base = layer.base_layer if isinstance(layer, LoraLinear) else layer
            if type(base) is not torch.nn.Linear:
                return False
            weights += [base.weight, layer.lora_A, layer.lora_B] if isinstance(layer, LoraLinear) else [base.weight]
            inputs.add(base.in_features)
        scalings = {layer.scaling for layer in layers if isinstance(layer, LoraLinear)}
        devices = {(w.device, w.dtype) for w in weights}
        offloaded = any(w.device.type == "meta" for w in weights)  # (accelerate's offload restores weights by their names)
        return len(devices) == 1 and not offloaded and len(inputs) == 1 and len(scalings) <= 1

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The layers' outputs side by side; with `residual`, residual + them (a decoder layer's sum)."""
        if residual is not None and self.lora_B is None and self.bias is None:
            # the sum in the GEMM's epilogue (beta = 1): one kernel where the product and the sum take two
            return torch.addmm(residual.reshape(-1, self.outputs), x.reshape(-1, x.shape[-1]), self.weight.t()).view(residual.shape)
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        if self.lora_B is not None:
            flat = y.view(-1, y.shape[-1])  # (view, not reshape: the sum goes into y itself)
            flat[:, : self.outputs].addmm_(flat[:, self.outputs :], self.lora_B.t(), alpha=self.scaling)
            y = y[..., : self.outputs]
        return y if residual is None else residual + y


class PackedAttention(torch.nn.Module):
    """transformers' LlamaAttention (its forward, 5.x) over one PackedLinear for q, k and v, the rotary
    embedding applied to q and k in one pass over both, and o_proj packed with its adapter's A. The
    rotary embedding takes five kernels where transformers' takes ten (its expression over q and k at
    once), four where the model's sin comes folded (FoldedRotary): the halves swapped in one cat, not
    a negation and a cat. The same products and sum in the same order, so a float32 forward equals
    transformers' up to the GEMMs' own rounding. (An addcmul would take three, but it rounds its
    product and sum once: float32 logits then move by up to 8e-6 on the tiny model.)"""

    def __init__(self, attention: LlamaAttention, qkv: PackedLinear, o_proj: PackedLinear):
        super().__init__()
        for name in ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout", "is_causal"):
            setattr(self, name, getattr(attention, name))
        self.heads = attention.config.num_attention_heads
        self.kv_heads = attention.config.num_key_value_heads
        self.qkv_proj = qkv
        self.o_proj = o_proj
        self.folded = False  # the model's rotary embedding is a FoldedRotary (packed_projections)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache=None, residual: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        qkv = self.qkv_proj(hidden_states).view(*input_shape, -1, self.head_dim)  # [B, T, Hq + 2 Hk, D]
        cos, sin = (t.unsqueeze(2) for t in position_embeddings)  # [B, T, 1, D]
        qk, value = qkv.split([self.heads + self.kv_heads, self.kv_heads], dim=2)
        if self.folded:  # sin is [-sin_1, sin_2] (FoldedRotary): rotate_half(x) * sin == [x_2, x_1] * folded sin
            half = self.head_dim // 2
            qk = (qk * cos) + (torch.cat((qk[..., half:], qk[..., :half]), dim=-1) * sin)
        else:
            qk = (qk * cos) + (rotate_half(qk) * sin)  # transformers' apply_rotary_pos_emb, over q and k at once
        query, key = qk.split([self.heads, self.kv_heads], dim=2)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # [B, H, T, D], as transformers'
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        # (dropout 0: the job only generates)
        output, weights = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(output.reshape(*input_shape, -1).contiguous(), residual), weights


class PackedMLP(torch.nn.Module):
    """transformers' LlamaMLP over one PackedLinear for gate and up (down_proj packed with its
    adapter's A): down(act(gate(x)) * up(x)), the same expression."""

    def __init__(self, mlp: LlamaMLP, gate_up: PackedLinear, down_proj: PackedLinear):
        super().__init__()
        self.gate_up_proj = gate_up
        self.down_proj = down_proj
        self.act_fn = mlp.act_fn
        self.intermediate = mlp.intermediate_size

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        return self.down_proj(self.act_fn(gate_up[..., : self.intermediate]) * gate_up[..., self.intermediate :], residual)


class PackedDecoderLayer(torch.nn.Module):
    """transformers' LlamaDecoderLayer over a PackedAttention and a PackedMLP, each residual sum handed
    to o_proj and down_proj: without an adapter (merged) or a bias, the sum is their GEMM's epilogue,
    two kernels a layer fewer; otherwise the same sum after them."""

    def __init__(self, layer: LlamaDecoderLayer):
        super().__init__()
        self.self_attn, self.mlp = layer.self_attn, layer.mlp
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, position_embeddings=None, cache=None,
                **kwargs) -> torch.Tensor:
        attended, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings=position_embeddings, attention_mask=attention_mask,
                                     cache=cache, residual=hidden_states, **kwargs)
        return self.mlp(self.post_attention_layernorm(attended), residual=attended)


class FoldedRotary(torch.nn.Module):
    """The model's rotary embedding, its sin handed to every layer with rotate_half's sign folded in:
    [-sin_1, sin_2] for halves sin_1, sin_2. rotate_half(x) * sin is then [x_2, x_1] * the folded sin,
    so that a PackedAttention rotates q and k in four kernels, not five: one product a forward, where
    each layer would take a negation. Only for a model whose every attention is a PackedAttention."""

    def __init__(self, rotary: torch.nn.Module):
        super().__init__()
        self.rotary = rotary
        half = rotary.inv_freq.shape[0]
        self.register_buffer("signs", torch.cat([-torch.ones(half), torch.ones(half)]).to(rotary.inv_freq.device), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(x, position_ids)
        if self.signs.dtype != sin.dtype or self.signs.device != sin.device:  # (once: the compute dtype's signs)
            self.signs = self.signs.to(sin)
        return cos, sin * self.signs  # (the sign: exact in any dtype)


@torch.no_grad()
def packed_projections(model) -> int:
    """Each of transformers' LlamaAttention and LlamaMLP modules whose projections are plain linear
    layers (dequantized, merged or unquantized; with or without LoraLinear adapters) replaced by a
    PackedAttention or PackedMLP holding the same weights, stacked, and each decoder layer whose
    attention and MLP both are by a PackedDecoderLayer. Layers left 4-bit or holding a LoRA variant
    stay as they are. Returns how many attention and MLP modules were replaced."""
    modules = [(parent, name) for parent in model.modules() for name, child in parent.named_children() if type(child) in (LlamaAttention, LlamaMLP)]
    replaced = 0
    # o_proj and down_proj: PackedLinears of one (a LoraLinear's A below its weight, two kernels not three;
    # a plain layer's own weight), so that they can take the decoder layer's residual sum
    for parent, name in modules:  # one at a time: each module's unstacked weights are freed before the next is stacked
        module = getattr(parent, name)
        if type(module) is LlamaAttention and PackedLinear.packs([module.q_proj, module.k_proj, module.v_proj]) and PackedLinear.packs([module.o_proj]):
            setattr(parent, name, PackedAttention(module, PackedLinear([module.q_proj, module.k_proj, module.v_proj]), PackedLinear([module.o_proj])))
        elif type(module) is LlamaMLP and PackedLinear.packs([module.gate_proj, module.up_proj]) and PackedLinear.packs([module.down_proj]):
            setattr(parent, name, PackedMLP(module, PackedLinear([module.gate_proj, module.up_proj]), PackedLinear([module.down_proj])))
        else:
            continue
        del module
        replaced += 1
    for parent in list(model.modules()):
        for name, layer in list(parent.named_children()):
            if type(layer) is LlamaDecoderLayer and type(layer.self_attn) is PackedAttention and type(layer.mlp) is PackedMLP:
                setattr(parent, name, PackedDecoderLayer(layer))
    fold_rotary(model)
    if replaced and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the unstacked weights' memory, for the KV cache
    return replaced


def fold_rotary(model) -> bool:
    """The model's rotary embedding made a FoldedRotary, where every attention is a PackedAttention
    (each told so). Returns whether it was."""
    attentions = [m for m in model.modules() if isinstance(m, (PackedAttention, LlamaAttention))]
    owners = [m for m in model.modules() if type(getattr(m, "rotary_emb", None)) is LlamaRotaryEmbedding]
    if not attentions or not all(type(m) is PackedAttention for m in attentions) or len(owners) != 1:
        return False
    owners[0].rotary_emb = FoldedRotary(owners[0].rotary_emb)
    for attention in attentions:
        attention.folded = True
    return True


def fused_norms(model, dtype: torch.dtype) -> None:
    """Each of transformers' LlamaRMSNorm layers (in `dtype`) replaced by torch's nn.RMSNorm holding the
    same weight: the same function, one kernel on a GPU (torch's fused rms_norm) where transformers'
    forward takes six to eight (casts, square, mean, add, rsqrt, two products), on the 7B model 65 norms
    in every forward and every decode step. In float32 the outputs are bitwise transformers'; in bf16
    the weight's product is taken before the one rounding to bf16 (transformers rounds before it and
    after), so answers may differ by rounding. On the CPU torch computes it as those same ops."""
    for parent in list(model.modules()):
        for name, norm in list(parent.named_children()):
            if type(norm) is LlamaRMSNorm and norm.weight.dtype == dtype:
                fused = torch.nn.RMSNorm(norm.weight.shape, eps=norm.variance_epsilon, device="meta")
                fused.weight = norm.weight
                setattr(parent, name, fused)
