"""Shared prompt prefixes computed once (batch.prefix): which rows share what, and outputs that do not change.

Greedy rows with sharing equal rows without it and the one-at-a-time reference (float32, NF4 + LoRA
with float32 compute), through refills, held prefixes that must give way to the budget, both kinds
of decode step, out-of-memory splits and a killed-and-resumed run; sampled rows draw the same tokens."""

import json
import signal

import pyarrow.parquet as pq
import pytest
import torch

from batch.cli import main
from batch.config import load_job
from batch import engine as engine_module
from batch.engine import Engine
from batch.fingerprints import settings_fingerprint
from batch.decode_attention import READ_ONCE_ROWS
from batch.errors import JobError
from batch.kv_cache import front_first
from batch.prefix import MIN_SAVED, MIN_SHARED, SAVED_SHARE, Prefixes, Use, aligned_columns, plan_sharing
from tests.conftest import make_job, parts, read_output, seed_rows, start, write_jsonl
from tests.test_exactness import MAX_NEW, load, prompts_40, reference, result, streamed, with_steps

M = MIN_SHARED
HEAD = tuple(range(100, 100 + 2 * M))  # a 2M-token head every row below starts with
DOC = tuple(range(300, 300 + 2 * M))  # a document some rows share after the head


def tail(i: int, n: int = 3) -> tuple:
    return tuple(range(1000 + 10 * i, 1000 + 10 * i + n))


def described(sharing) -> tuple:
    """(each level's nodes as (length, extends k tokens of a node of length ...)), each row's (node length, k))."""
    levels = [sorted((len(key), (len(u.key), u.k) if u else None) for key, u in level) for level in sharing.levels]
    return levels, [(len(u.key), u.k) if u else None for u in sharing.rows]


H, D = len(HEAD), len(DOC)
CASES = {  # name: (rows, held, expected levels, expected rows' (node length, columns used)), every branch point that pays or not
    "one head": ([HEAD + tail(i) for i in range(3)], [], [[(H, None)]], [(H, H)] * 3),
    "head, then a shared document": (
        [HEAD + tail(0), HEAD + DOC + tail(1), HEAD + DOC + tail(2)], [],
        [[(H, None)], [(H + D, (H, H))]], [(H, H), (H + D, H + D), (H + D, H + D)]),
    "a held head: nothing to compute": ([HEAD + tail(i) for i in range(2)], [HEAD + DOC], [], [(H + D, H)] * 2),
    "part of a held node": ([HEAD[:-3] + tail(0)], [HEAD], [], [(H, H - 3)]),
    "too short to share": ([HEAD[: M - 1] + tail(i) for i in range(3)], [], [], [None] * 3),
    "a row that is the prefix of another keeps its last token": ([HEAD, HEAD + tail(0)], [], [[(H, None)]], [(H, H - 1), (H, H)]),
    "identical rows share all but the last token": ([HEAD + tail(0)] * 2, [], [[(H + 2, None)]], [(H + 2, H + 2)] * 2),
    "a row alone shares nothing": ([HEAD + tail(0)], [], [], [None]),
    "another first token shares nothing": ([HEAD + tail(0), (7,) + HEAD], [], [], [None, None]),
    "a longer branch worth less than MIN_SHARED is not made": (
        [HEAD + DOC[:3] + tail(0), HEAD + DOC[:3] + tail(1), HEAD + tail(2)], [], [[(H, None)]], [(H, H)] * 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plan_sharing_finds_the_shared_prefixes(case):
    rows, held, levels, uses = CASES[case]
    assert described(plan_sharing(rows, held, min_saved=0, saved_share=0)) == (levels, uses)


def own(i: int, n: int) -> tuple:
    """Row i's own n tokens (no other row's)."""
    return tuple(range(10_000 + 1000 * i, 10_000 + 1000 * i + n))


INSTR = tuple(range(2000, 2200))  # a 200-token instruction
SPAN = tuple(range(3000, 3200))  # 200 tokens two rows of bench.yaml happen to share (one passage)
BOS = (1,)
RULE_CASES = {  # name: (rows, held, expected levels, expected rows' (node length, columns used)): only where it pays
    "bench.yaml: two of 32 rows share 200 tokens, 2.5% of the join's": (
        [BOS + own(i, 250) for i in range(30)] + [BOS + SPAN + own(30 + j, 10) for j in range(2)], [], [], [None] * 32),
    "a head that saves fewer than MIN_SAVED tokens": ([HEAD + tail(i) for i in range(3)], [], [], [None] * 3),
    "an instruction every row starts with": ([INSTR + own(i, 20) for i in range(8)], [], [[(200, None)]], [(200, 200)] * 8),
    "a short branch below the instruction is not made": (
        [INSTR + own(i, 20) for i in range(6)] + [INSTR + DOC + own(6 + j, 3) for j in range(2)], [], [[(200, None)]], [(200, 200)] * 8),
    "a document asked four questions": (
        [BOS + own(i, 300) for i in range(8)] + [BOS + SPAN + DOC + own(8 + j, 5) for j in range(4)], [],
        [[(233, None)]], [None] * 8 + [(233, 233)] * 4),
    "a held instruction: nothing to compute": ([INSTR + own(i, 20) for i in range(3)], [INSTR], [], [(200, 200)] * 3),
    "a held node's first tokens only, 6% of the join's: not used": ([INSTR[:20] + own(i, 300) for i in range(4)], [INSTR], [], [None] * 4),
}


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_plan_sharing_shares_only_where_it_pays(case):
    """A new prefix must save MIN_SAVED tokens (its tokens once for each row below it but one), and a
    join's sharing SAVED_SHARE of its rows' prompt tokens: sharing costs forwards of its own."""
    assert (MIN_SAVED, SAVED_SHARE) == (128, 0.1)  # (the cases are drawn around these)
    rows, held, levels, uses = RULE_CASES[case]
    assert described(plan_sharing(rows, held)) == (levels, uses)


def test_plan_sharing_marks_what_it_uses():
    sharing = plan_sharing([HEAD + DOC + tail(0), HEAD + DOC + tail(1)], [HEAD, (7,) * (2 * M)], min_saved=0, saved_share=0)
    assert sharing.used() == {HEAD, HEAD + DOC}  # the held head is extended; the unrelated node is not kept
    assert sharing.levels == [[(HEAD + DOC, Use(HEAD, H))]]


def test_aligned_columns_is_front_first_without_a_past_and_left_aligns_with_one():
    assert torch.equal(aligned_columns([0, 0, 0], [4, 2, 1], 0, 4), front_first([4, 2, 1], 4, "cpu"))
    # pasts of 3 columns (prefixes of 3 and 1), suffixes left-padded to 2 (lengths 2 and 1)
    layout = torch.tensor([[1.0, 2, 3, 4, 5], [0, 0, 6, 0, 7]])  # [pad.. prefix | pad.. suffix]
    source = aligned_columns([3, 1], [2, 1], 3, 2)
    aligned = layout.gather(1, source)
    assert aligned[0].tolist() == [1, 2, 3, 4, 5] and aligned[1, :2].tolist() == [6, 7]


def test_a_decode_step_reads_once_only_the_computation_every_row_copied():
    prefixes = Prefixes()
    prefixes.add(HEAD, [(torch.zeros(1, 2, H, 4), torch.zeros(1, 2, H, 4))])
    prefixes.add(HEAD + DOC, [(torch.ones(1, 2, H + D, 4), torch.ones(1, 2, H + D, 4))])
    head, doc = prefixes.tag(Use(HEAD, H)), prefixes.tag(Use(HEAD + DOC, H + D))
    part = prefixes.tag(Use(HEAD, H - 3))
    layers, columns = prefixes.read_once([head, part, head])
    assert layers is prefixes.nodes[HEAD] and columns == H - 3  # the columns every row has
    assert prefixes.read_once([head, doc]) is None and prefixes.read_once([head, None]) is None and prefixes.read_once([]) is None
    prefixes.keep({HEAD + DOC})
    assert prefixes.read_once([head]) is None  # dropped: its rows' copies are read
    prefixes.add(HEAD, [(torch.zeros(1, 2, H, 4), torch.zeros(1, 2, H, 4))])
    assert prefixes.read_once([head]) is None  # made again (it may round otherwise): not the one the rows copied
    assert prefixes.read_once([prefixes.tag(Use(HEAD, H)), doc]) is None and prefixes.read_once([doc, doc])[1] == H + D


def test_a_group_of_one_prefix_reads_its_keys_without_a_copy():
    """Rows that all start from one prefix get views of its keys and values (expanded, no copy), with
    the values and mask that the general layout (mixed prefixes, zero-padded on the left) gives them."""
    prefixes = Prefixes()
    node = lambda seed, n: [tuple(torch.randn(1, 2, n, 4, generator=torch.Generator().manual_seed(seed + p)) for p in (0, 1)) for _ in range(3)]
    prefixes.add(HEAD, node(0, H))
    prefixes.add(DOC, node(1, D))
    u, v = Use(HEAD, H - 2), Use(DOC, D)
    views, mask = prefixes.past([u, u, u])
    mixed, mixed_mask = prefixes.past([u, u, u, v])  # the general layout, one row more
    assert all(k.data_ptr() == n[0].data_ptr() and vv.data_ptr() == n[1].data_ptr() for (k, vv), n in zip(views, prefixes.nodes[HEAD]))
    width = H - 2
    for (k, vv), (mk, mv) in zip(views, mixed):
        assert k.shape == (3, 2, width, 4)
        assert torch.equal(k, mk[:3, :, -width:]) and torch.equal(vv, mv[:3, :, -width:])
    assert torch.equal(mask, mixed_mask[:3, -width:]) and bool(mask.all())


# --- the engine on the tiny model ------------------------------------------------------------------

INSTRUCTION = ("You are a careful annotator. Read the item below, label its sentiment as positive, negative or "
               "neutral, and explain the label in one sentence. 항목을 읽고 감정을 분류하세요. ")
DOCUMENT = " The report: 자동차 종합검사 의무기간은 2년입니다. Inspections are due every two years for cars. Question:"


def shared_prompts() -> list[str]:
    """The annotation shape: one long instruction, then each row's item; some rows ask about one document."""
    items = [p.removeprefix("### instruction: ").removesuffix("\n\n### Response:") for p in prompts_40()]
    rows = [f"### instruction: {INSTRUCTION}{item}\n\n### Response:" for item in items[:24]]
    rows += [f"### instruction: {INSTRUCTION}{DOCUMENT} {q}\n\n### Response:" for q in ("Why?", "When?", "How often, and why?", "Who checks it?")]
    return rows


def bench_prompts(engine, job: str, n: int) -> list[list[int]]:
    """The first n prompts of a bench file's workload (batch.bench.prompts), tokenized (the tiny model's
    tokenizer is the bench model's)."""
    from batch.bench.prompts import make_prompts
    from batch.bench.settings import ROOT, load_bench

    cfg = load_bench(ROOT / "jobs" / job, [f"prompts={n}"])
    return engine.tokenize(make_prompts(cfg, engine.tokenizer, n, cfg.seed))


def test_bench_prompts_prefill_as_unshared_and_annotation_prompts_share():
    """jobs/bench.yaml's prompts share only the template's short head, and now and then a passage that
    two rows happen to start with (a small share of their join's tokens): sharing on computes exactly
    the prefills of sharing off. The annotation workload's instruction is still shared."""
    engine = load("float32", max_new_tokens=16)
    for job, n in (("bench.yaml", 512), ("bench-annotation.yaml", 128)):
        ids = bench_prompts(engine, job, n)
        runs = {}
        for share in (True, False):
            e = Engine(engine.model, engine.tokenizer, engine.settings, fixed_shapes=False, share_prefix=share)
            runs[share] = (streamed(e, ids, 32, 65536), e.prefills, e.padded_prompt_tokens, e.shared_prompt_tokens, e.prefilled_prompt_tokens)
        (on, *on_counts), (off, *off_counts) = runs[True], runs[False]
        total = sum(map(len, ids))
        assert on == off and off_counts[2:] == [0, total]
        if job == "bench.yaml":
            assert on_counts == off_counts  # the same forwards, padding, and nothing shared
        else:
            assert on_counts[2] > 0.8 * total and on_counts[3] <= 0.2 * total, (on_counts, total)  # (the target: <= 20% prefilled)


@pytest.mark.parametrize("variant", ["float32", "nf4+lora"])
def test_shared_prefixes_give_the_reference_outputs(variant):
    engine = load(variant)
    ids = engine.tokenize(shared_prompts())
    expected = [reference(engine, p) for p in ids]
    longest = max(map(len, ids))
    # (a budget of 3 rows: the prefixes held take places, or give way when a row would not fit)
    streams = [(8, 10**9, False), (5, 4 * (longest + MAX_NEW), True), (3, 3 * (longest + MAX_NEW), False)]
    for fixed in (False, True):
        for share in (True, False):
            e = Engine(engine.model, engine.tokenizer, engine.settings, fixed_shapes=fixed, share_prefix=share)
            e.prefixes = Prefixes(min_saved=0, saved_share=0)  # the document too, paying or not: two levels
            runs = streams[1:2] if fixed else streams
            for max_rows, budget, shuffle in runs:
                got = streamed(e, ids, max_rows, budget, shuffle)
                mismatches = [(i, x, y) for i, (x, y) in enumerate(zip(expected, got)) if x != y]
                assert not mismatches, (fixed, share, max_rows, budget, mismatches[:3])
            total = len(runs) * sum(map(len, ids))
            if share:  # the instruction computed once per stream, or a few times when the budget drops it
                assert e.shared_prompt_tokens > 0.6 * total and e.prefilled_prompt_tokens < 0.4 * total
            else:
                assert e.shared_prompt_tokens == 0 and e.prefilled_prompt_tokens == total


@pytest.mark.parametrize("variant", ["float32", "nf4+lora"])
def test_decode_steps_that_read_the_shared_prefix_once_give_the_reference_outputs(variant, monkeypatch):
    """Where every running row starts from one shared prefix, an eager decode step reads its columns
    once for all rows (batch.decode_attention.shared_attention): by the rule (16 rows and more here),
    and at every step it can (the rule forced), through refills, budgets that drop the prefix, and
    rows of another prefix beside them (the document's: those steps read every row's copy)."""
    engine = load(variant)
    prompts = shared_prompts()
    ids = engine.tokenize(prompts)
    expected = [reference(engine, p) for p in ids]
    one_prefix = list(range(24))  # the rows of the instruction alone
    longest = max(map(len, ids))
    for max_rows, reads in ((24, True), (READ_ONCE_ROWS - 1, False)):  # the rule: at least 16 rows
        e = Engine(engine.model, engine.tokenizer, engine.settings, fixed_shapes=False)
        assert streamed(e, [ids[i] for i in one_prefix], max_rows, 10**9) == [expected[i] for i in one_prefix]
        assert (e.shared_reads > 0) == reads, (max_rows, e.shared_reads, e.steps)
    monkeypatch.setattr(engine_module, "reads_once", lambda rows, shared, columns: True)
    counts = []  # (steps that read the prefix once, steps) of each stream
    for max_rows, budget, shuffle in [(8, 10**9, False), (5, 4 * (longest + MAX_NEW), True), (3, 3 * (longest + MAX_NEW), False)]:
        e = Engine(engine.model, engine.tokenizer, engine.settings, fixed_shapes=False)
        e.prefixes = Prefixes(min_saved=0, saved_share=0)  # the document too: rows of two prefixes
        got = streamed(e, ids, max_rows, budget, shuffle)
        mismatches = [(i, x, y) for i, (x, y) in enumerate(zip(expected, got)) if x != y]
        assert not mismatches, (max_rows, budget, mismatches[:3])
        counts.append((e.shared_reads, e.steps))
    assert all(reads > 0 for reads, _ in counts) and any(reads < steps for reads, steps in counts), counts


def test_sampled_rows_draw_the_same_tokens_with_and_without_sharing(monkeypatch):
    monkeypatch.setattr(engine_module, "reads_once", lambda rows, shared, columns: True)  # (4 rows: under the rule)
    card = dict(do_sample=True, temperature=0.9, top_p=0.7, top_k=100)
    engine = load("float32+lora", **card)
    ids = engine.tokenize(shared_prompts()[::2])
    seeds = [7 * i + 1 for i in range(len(ids))]
    alone = [result(engine.generate([p], [s])[0]) for p, s in zip(ids, seeds)]
    for share in (True, False):
        e = Engine(engine.model, engine.tokenizer, engine.settings, fixed_shapes=False, share_prefix=share)
        e.prefixes = Prefixes(min_saved=0, saved_share=0)
        assert streamed(e, ids, 4, 10**9, shuffle=True, seeds=seeds) == alone
        assert (e.shared_prompt_tokens > 0) == share and (e.shared_reads > 0) == share


# --- a job: the setting, the counts, out-of-memory splits, a resume ----------------------------------


def annotation_rows(n: int) -> list[dict]:
    seeds = seed_rows()
    return [{"id": f"a{i:02d}", "item": seeds[i % 9]["instruction"] + " 더" * (i % 5)} for i in range(n)]


# (~240 tokens: shared even by two rows joining together, as after an out-of-memory split: batch.prefix.MIN_SAVED)
GUIDELINES = INSTRUCTION + "Guidelines: " + INSTRUCTION


def job_for(tmp_path, name, rows, share, **sections):
    src = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    return make_job(tmp_path, src, f"{name}.yaml", output={"path": str(tmp_path / f"{name}.parquet")},
                    prompt={"template": f"### instruction: {GUIDELINES}{{item}}\n\n### Response:"},
                    batching={"max_batch_size": 4, "max_batch_tokens": 4096, "share_prefix": share}, **sections)


def test_the_setting_is_validated_and_stays_out_of_the_plan(tmp_path):
    rows = annotation_rows(2)
    on, off = load_job(job_for(tmp_path, "on", rows, True)), load_job(job_for(tmp_path, "off", rows, False))
    assert on.batching.share_prefix and not off.batching.share_prefix
    off.output.path = on.output.path
    assert settings_fingerprint(on) == settings_fingerprint(off)
    with pytest.raises(JobError, match=r"batching.share_prefix: expected true/false, got str 'sometimes'"):
        load_job(job_for(tmp_path, "bad", rows, "sometimes"))


def test_out_of_memory_splits_with_shared_prefixes_match_a_run_without(tmp_path, monkeypatch, capsys):
    from tests.test_bad_input import inject

    rows = annotation_rows(8)
    opts = dict(generation={"max_new_tokens": 12}, checkpoint={"every_rows": 8})
    assert main(["run", str(job_for(tmp_path, "ref", rows, False, **opts)), "--no-progress"]) == 0
    reference_rows = read_output(tmp_path / "ref.parquet")
    assert "0 shared (a prefix computed once)" in capsys.readouterr().err
    calls = inject(monkeypatch, lambda prompts: RuntimeError("DefaultCPUAllocator: can't allocate memory") if len(prompts) > 2 else None)
    job = job_for(tmp_path, "split", rows, True, **opts)
    assert main(["run", str(job), "--no-progress"]) == 0
    assert read_output(tmp_path / "split.parquet") == reference_rows
    assert max(calls) > 2 and calls[-1] <= 2
    summary = json.loads((tmp_path / "split.summary.json").read_text())
    assert summary["oom_splits"] >= 1 and summary["shared_prompt_tokens"] > summary["prefilled_prompt_tokens"] > 0
    err = capsys.readouterr().err
    assert f"komt-batch: prompt tokens: {summary['prompt_tokens']}; {summary['shared_prompt_tokens']} shared (a prefix computed once), {summary['prefilled_prompt_tokens']} prefilled" in err


def test_a_killed_run_with_shared_prefixes_resumes_to_the_file_without(tmp_path):
    from tests.test_resume import wait_for_parts

    rows = annotation_rows(48)
    opts = dict(generation={"max_new_tokens": 24}, checkpoint={"every_rows": 2})
    ref = job_for(tmp_path, "ref", rows, False, **opts)
    assert main(["run", str(ref), "--no-progress"]) == 0
    job = job_for(tmp_path, "job", rows, True, **opts)
    out = tmp_path / "job.parquet"
    proc = start(job)
    wait_for_parts(out, 2, proc)
    assert proc.poll() is None, "the run finished before it could be killed; make the job longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(parts(out))
    assert main(["run", str(job), "--no-progress"]) == 0
    assert pq.read_table(out).equals(pq.read_table(tmp_path / "ref.parquet"))
