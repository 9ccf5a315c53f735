"""The fixed-shape decode step (batch/decode_step.py) on the CPU: what a CUDA graph needs of it, and
its capture / replay / fallback logic with a stand-in for torch.cuda's graphs."""

import re

from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from batch import decode_step
from batch.decode_step import REPLAY_TOLERANCE, replay_difference
from batch.engine import BatchFailed, Engine, Request, Requests, row_seed
from tests.test_exactness import OPTIONS, load, prompts_40, streamed

# Operators that hand a tensor's values to the host (a sync, and illegal while a CUDA stream is being
# captured), make a tensor from host data (a host-to-device copy of memory the graph does not own),
# or have an output shape that depends on values.
HOST_READS = {
    "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero",
    "aten::nonzero_static", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
    "aten::unique_consecutive", "aten::lift_fresh", "aten::lift_fresh_copy", "aten::repeat_interleave",
}


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func._schema.name)
        return func(*args, **(kwargs or {}))


CARD = dict(do_sample=True, temperature=0.9, top_p=0.7, top_k=100)


@pytest.mark.parametrize("variant, options", [("float32+lora", {}), ("nf4+lora", {}), ("dequantized+lora", {}), ("float32+lora", OPTIONS)],
                         ids=["float32+lora", "nf4+lora", "dequantized+lora", "float32+lora+options"])
def test_a_fixed_shape_step_reads_nothing_on_the_host(variant, options, monkeypatch):
    """Every operator of the step -- llama layers, peft's LoRA, the 4D mask, sampling, the flags --
    keeps values on the device: what a CUDA graph can capture. (bitsandbytes' 4-bit layers run their
    CPU kernels here; their CUDA kernels are checked by the capture itself, on a GPU.)"""
    engine = load(variant, fixed_shapes=True, **CARD, **options)
    ops = []
    run = decode_step.DecodeStep._run

    def spy(self, inputs, batch):
        with Ops() as mode:
            out = run(self, inputs, batch)
        ops.append(mode.seen)
        return out

    monkeypatch.setattr(decode_step.DecodeStep, "_run", spy)
    ids = engine.tokenize(prompts_40()[:5])
    list(engine.stream(Requests(Request(i, p, row_seed(0, str(i))) for i, p in enumerate(ids)), 5, 10**6))
    assert len(ops) > 5
    seen = set().union(*ops)
    assert "aten::scatter_" in seen and "aten::argmax" in seen  # the cache write and the choice are in it
    assert not seen & HOST_READS, seen & HOST_READS


def test_a_fixed_shape_step_over_extents_that_reads_a_prefix_once_reads_nothing_on_the_host(monkeypatch):
    """The same for a step over a cache of extents that reads the rows' shared prefix once (its
    sequences made on the device, the kernel's log-sum-exps by packed query: packed_lse). The kernel
    is a GPU's launch: its contract (reference_kernel, which checks its bounds on the host) runs
    unseen."""
    from torch.utils._python_dispatch import _disable_current_modes

    from batch import engine as engine_module
    from batch.decode_attention import packed_lse, reference_kernel
    from batch.prefix import Prefixes
    from tests.test_prefix import shared_prompts

    def kernel(*args, **kwargs):
        with _disable_current_modes():
            return reference_kernel(*args, **kwargs)

    monkeypatch.setattr(engine_module, "reads_once", lambda rows, shared, columns: True)
    card = load("float32+lora", **CARD)
    engine = Engine(card.model, card.tokenizer, card.settings, fixed_shapes=True, rows_kernel=kernel, extents=True, packed_prefill=True)
    engine.prefixes = Prefixes(min_saved=0, saved_share=0)
    ops = []
    run = decode_step.DecodeStep._run

    def spy(self, inputs, batch):
        with Ops() as mode:
            out = run(self, inputs, batch)
        ops.append((inputs.shared is not None, mode.seen))
        return out

    monkeypatch.setattr(decode_step.DecodeStep, "_run", spy)
    ids = engine.tokenize(shared_prompts()[:8])
    list(engine.stream(Requests(Request(i, p, row_seed(0, str(i))) for i, p in enumerate(ids)), 8, 10**6))
    read_once = [seen for shared, seen in ops if shared]
    assert len(read_once) > 5
    seen = set().union(*read_once)
    assert "aten::sigmoid" in seen and "aten::lerp" in seen  # the two parts' merge is in it
    assert not seen & HOST_READS, seen & HOST_READS
    lse, starts = torch.randn(3, 2, 32), torch.tensor([0, 2, 3, 7], dtype=torch.int32)
    with Ops() as mode:
        packed_lse(lse, starts, 7)
    assert "aten::searchsorted" in mode.seen and not mode.seen & HOST_READS, mode.seen & HOST_READS


def test_padding_rows_compute_finite_values(monkeypatch):
    """A padding row attends at least to its own column, so nothing it writes is NaN (a NaN key or
    value would reach running rows that later take its slot, even under their mask)."""
    engine = load("float32", fixed_shapes=True)
    seen = []  # (rows computed, rows running, all logits finite)
    run = decode_step.DecodeStep._run

    def check(self, inputs, batch):
        out, logits = run(self, inputs, batch)
        seen.append((logits.shape[0], batch.n, bool(torch.isfinite(logits).all())))
        return out, logits

    monkeypatch.setattr(decode_step.DecodeStep, "_run", check)
    streamed(engine, engine.tokenize(prompts_40()), 8, 10**9, shuffle=True)
    assert sum(rows > n for rows, n, _ in seen) > 10 and all(finite for *_, finite in seen)


class StandInGraph:
    """torch.cuda.CUDAGraph's contract at the Python level: capturing executes nothing (the rows'
    state is put back), a replay recomputes the captured outputs in place."""

    captures = 0

    def __init__(self, run, state, seen=None):
        saved = state.clone(), None if seen is None else seen.clone()
        self.run, self.outputs = run, run()
        state.copy_(saved[0])
        if seen is not None:
            seen.copy_(saved[1])
        StandInGraph.captures += 1

    def replay(self):
        for mine, new in zip(self.outputs, self.run()):
            mine.copy_(new)

    def pool(self):
        return "pool"


def stand_in_cuda(monkeypatch, capture):
    """Let a CPU engine take the graph path: warm-ups without streams, captures by StandInGraph."""
    def warm_up(run, restore, stream):
        for _ in range(decode_step.CAPTURE_WARMUP):
            _, logits = run()
            restore()
        return logits

    monkeypatch.setattr(decode_step, "_side_stream", lambda: "stream")
    monkeypatch.setattr(decode_step, "_warm_up", warm_up)
    monkeypatch.setattr(decode_step, "_capture_graph", capture)


def replayed_by_stand_ins(monkeypatch, on_step: Callable | None = None) -> None:
    """Decode steps with graphs on take the graph path on the CPU (stand_in_cuda): StandInGraph
    captures over each step's rows' state and seen tokens; `on_step(step, batch, rows)` before each."""
    states = {}

    def capture(run, pool, stream):
        graph = StandInGraph(run, states["state"], states["seen"])
        return graph, graph.outputs

    stand_in_cuda(monkeypatch, capture)
    step_call = decode_step.DecodeStep.__call__

    def remember_state(self, batch, rows, whole):
        states["state"] = batch.state[:, :rows]
        states["seen"] = None if batch.seen is None else batch.seen[:rows]
        if on_step is not None:
            on_step(self, batch, rows)
        return step_call(self, batch, rows, whole)

    monkeypatch.setattr(decode_step.DecodeStep, "__call__", remember_state)


@pytest.mark.parametrize("options", [{}, OPTIONS], ids=["card", "options"])
def test_replayed_steps_give_the_eager_steps_tokens(options, monkeypatch):
    card = load("float32+lora", **CARD, **options)
    ids = card.tokenize(prompts_40())
    seeds = [row_seed(0, str(i)) for i in range(len(ids))]
    expected = streamed(card, ids, 6, 700, shuffle=True, seeds=seeds)  # buffer remade with rows running
    engine = Engine(card.model, card.tokenizer, card.settings, fixed_shapes=True)
    engine.step.graphs = True  # (on a GPU: Engine(cuda_graphs=True))
    replays = []  # (slots: no step reads a shared prefix once, so its graph's shape is (rows, None))
    replayed_by_stand_ins(monkeypatch, lambda step, batch, rows: replays.append((rows, None) in step._graphs and batch.buffer == step._buffer))
    StandInGraph.captures = 0
    assert streamed(engine, ids, 6, 700, shuffle=True, seeds=seeds) == expected
    assert engine.step.graphs and 2 <= StandInGraph.captures < 20 and sum(replays) > 10 * StandInGraph.captures
    # a step that captured is one-off time: booked apart from the decode steps' own
    assert engine.step.captures == StandInGraph.captures and engine.decode_steps == engine.steps - engine.step.captures
    assert engine.capture_seconds > 0 and engine.decode_seconds > 0
    assert engine.forward_seconds == pytest.approx(engine.prefill_seconds + engine.decode_seconds + engine.capture_seconds)


def test_a_capture_that_fails_leaves_the_step_eager(monkeypatch, capsys):
    engine = load("float32", fixed_shapes=True)
    ids = engine.tokenize(prompts_40()[:12])
    expected = streamed(engine, ids, 5, 10**9)
    engine.step.graphs = True

    def capture(run, pool, stream):
        run()  # as if the capture got half-way, then failed
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    stand_in_cuda(monkeypatch, capture)
    assert streamed(engine, ids, 5, 10**9) == expected
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["komt-batch: CUDA graph capture failed (RuntimeError: operation not permitted when stream is capturing); decoding eagerly"]
    assert not engine.step.graphs


def test_replay_difference_tells_rounding_from_a_broken_capture():
    eager = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0))
    rounded = eager.bfloat16().float()  # every logit rounded to bf16: about 0.2% of a row
    distance, agree = replay_difference(rounded, eager)
    assert 0 < distance < 0.01 and agree == 1.0
    for broken in (torch.randn(6, 1000), torch.zeros(6, 1000), eager.roll(1, dims=0)):  # garbage, nothing, another row's
        assert replay_difference(broken, eager)[0] > 0.9 > REPLAY_TOLERANCE
    nan = rounded.clone()
    nan[2, 5] = float("nan")
    assert replay_difference(nan, eager)[0] == float("inf")
    masked = eager.clone()
    masked[1, 3] = float("-inf")  # a logit masked out in both: no difference
    assert replay_difference(masked.clone(), masked) == (0.0, 1.0)
    assert replay_difference(eager[:0], eager[:0]) == (0.0, 1.0)  # no running rows: nothing to compare


@pytest.mark.parametrize("noise, padding_garbage, kept", [(0.05, False, True), (0.0, True, True), (0.3, False, False)])
def test_a_capture_is_kept_when_its_replay_differs_by_rounding_only(noise, padding_garbage, kept, monkeypatch, capsys):
    """The running rows' logits are compared (padding rows' are never used); a difference of rounding
    keeps the graph and is logged once, a larger one refuses it."""
    engine = load("float32", fixed_shapes=True)
    places, prompts = (8, 5) if padding_garbage else (6, 16)  # (5 rows in 8 places: 3 padding rows at the first capture)
    ids = engine.tokenize(prompts_40()[:prompts])
    expected = streamed(engine, ids, places, 10**9, shuffle=True)
    engine.step.graphs = True
    seen, captured = {}, []
    call = decode_step.DecodeStep.__call__
    monkeypatch.setattr(decode_step.DecodeStep, "__call__", lambda self, batch, rows, whole: (seen.update(state=batch.state[:, :rows], n=batch.n), call(self, batch, rows, whole))[1])

    class Rounding(StandInGraph):
        def replay(self):
            super().replay()
            logits, n = self.outputs[1], seen["n"]
            logits[:n] *= 1 + noise * torch.tensor([1.0, -1.0]).repeat(logits.shape[1] // 2)  # every row moved by `noise` (L2)
            if padding_garbage:
                logits[n:] = 1e9

    def capture(run, pool, stream):
        captured.append((seen["state"].shape[1], seen["n"]))
        graph = Rounding(run, seen["state"])
        return graph, graph.outputs

    stand_in_cuda(monkeypatch, capture)
    assert streamed(engine, ids, places, 10**9, shuffle=True) == expected
    err = capsys.readouterr().err.strip().splitlines()
    assert engine.step.graphs is kept
    if kept:
        rows, n = captured[0]
        assert len(err) == 1 and re.fullmatch(
            rf"komt-batch: CUDA graphs: the decode step of {rows} rows captured; its logits differ from the eager step's by up to "
            rf"{noise:.2%} of a row's \(L2; 25% allowed\) and the greedy tokens of \d+% of its {n} rows agree", err[0]), err
        assert len(captured) > 1 and (not padding_garbage or rows > n)
    else:
        assert len(captured) == 1 and len(err) == 1 and re.fullmatch(
            r"komt-batch: CUDA graph capture failed \(RuntimeError: its replay does not give the eager step: its logits differ from the "
            rf"eager step's by up to 30.00% of a row's \(L2; 25% allowed\) and the greedy tokens of \d+% of its {captured[0][1]} rows "
            r"agree\); decoding eagerly", err[0]), err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("variant", ["float32+lora", "nf4+lora", "dequantized+lora", "merged+lora"])
def test_on_a_gpu_replayed_graphs_give_the_eager_fixed_shape_tokens(variant, monkeypatch, capsys):
    """The real capture: the tiny model on the GPU (float32 compute), greedy and sampled, decodes the
    same tokens with graphs as eagerly at the same shapes, and no capture falls back."""
    from batch.config import GenerationSettings
    from batch.loading import load_model
    from tests.test_exactness import MAX_NEW, model_config

    model, tokenizer = load_model(model_config(variant, device_map="cuda:0"))
    captures = []
    capture = decode_step._capture_graph
    monkeypatch.setattr(decode_step, "_capture_graph", lambda run, pool, stream: (captures.append(1), capture(run, pool, stream))[1])
    for settings in (GenerationSettings(max_new_tokens=MAX_NEW, do_sample=False), GenerationSettings(max_new_tokens=MAX_NEW, **CARD),
                     GenerationSettings(max_new_tokens=MAX_NEW, **CARD, **OPTIONS)):
        eager = Engine(model, tokenizer, settings, cuda_graphs=False, fixed_shapes=True)
        graphs = Engine(model, tokenizer, settings)
        assert eager.fixed_shapes and graphs.step.graphs
        ids = eager.tokenize(prompts_40())
        seeds = [row_seed(0, str(i)) for i in range(len(ids))]
        for max_rows, budget in [(8, 10**9), (6, 700)]:  # (700: new buffers mid-run)
            expected = streamed(eager, ids, max_rows, budget, shuffle=True, seeds=seeds)
            assert streamed(graphs, ids, max_rows, budget, shuffle=True, seeds=seeds) == expected
        assert graphs.step.graphs and graphs.decode_seconds > 0
    assert len(captures) >= 4 and "capture failed" not in capsys.readouterr().err


def test_out_of_memory_in_a_capture_is_the_streams_to_handle_not_a_reason_to_stop_capturing(monkeypatch, capsys):
    engine = load("float32", fixed_shapes=True)
    ids = engine.tokenize(prompts_40()[:12])
    engine.step.graphs = True

    def capture(run, pool, stream):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    stand_in_cuda(monkeypatch, capture)
    with pytest.raises(BatchFailed) as failed:  # with its rows: SafeGenerator splits them and lowers the budget
        streamed(engine, ids, 5, 10**9)
    assert isinstance(failed.value.cause, torch.cuda.OutOfMemoryError) and failed.value.unfinished
    assert engine.step.graphs and "capture failed" not in capsys.readouterr().err
