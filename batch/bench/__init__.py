"""komt-batch bench: how fast is this job's engine, against the usual ways of running the same model?

In one process, on the same model and the same prompts, with the job's stop words, the modes listed
in `modes`, in this order (greedy unless said otherwise):

  1. single    -- the model card's way: one prompt at a time, `model.generate(..., stop_strings=,
                  tokenizer=)` (slow: `single_limit: K` times it on the first K prompts only; tokens/s
                  is a rate, so it stays comparable, and the agreement check covers those K rows);
  2. fixed     -- fixed-size batches in input order, left-padded (pad = <unk>, attention mask),
                  `model.generate` with stop_strings (`fixed_limit: K`: the first K prompts only);
  3. engine    -- this job's own code, as `komt-batch run` uses it: `plan_batches` +
                  `SafeGenerator.for_job` over `Engine.stream` (finished rows' places refilled from
                  the next batches), on the weights as loaded (NF4 resident for NF4 variants);
  4. dequantized -- the same, after the NF4 layers are dequantized once (`loading.dequantize_model`,
                  what `model.weights: dequantized` does); skipped for unquantized variants;
  5. sampling  -- the same, with the model card's sampling settings (temperature 0.9, top_p 0.7,
                  top_k 100; per-row seeds);
  6. generate_batch -- transformers' own continuous batching (`continuous_batching_context_manager`,
                  what `model.generate_batch` runs), the library's answer to the same problem; it has
                  no stop words (rows run to EOS or max_new_tokens, what follows a stop word is waste)
                  and its one-off setup (KV-cache pages, CUDA-graph warm-up) is timed apart;
  7. unshared  -- mode 3's engine with batching.share_prefix: false (every row prefills its whole prompt),
                  on mode 4's weights for NF4 variants: sharing on vs off side by side (the targets
                  compare it with mode 4, else 3: on jobs/bench-annotation.yaml, a shared instruction,
                  at most 20% of the prompt tokens prefilled and 3x the tok/s; on jobs/bench.yaml no
                  regression, 0.97x);
  8. vllm      -- where vLLM is installed (CPU only), `LLM.generate` with the same stop words. It
                  needs its own virtual environment (it pins transformers<5.20), so it runs as a
                  subprocess: `tools/vllm_bench.py` under `vllm_python`, on the same saved float32
                  model directory (and LoRA adapter directory); that python is the bench file's
                  `vllm_python`, else $KOMT_VLLM_PYTHON; skipped, with a note, when neither names one.
                  How to install it (outside the repo) and what it needs: docs/performance.md, the
                  vLLM peer.

For NF4 variants modes 1-3 run on the 4-bit weights and modes 4-7 on the dequantized ones (the model
is dequantized in place once, before the first of them): the `weights` column says which. A variant
`...+lora+merged` loads with `model.merge_adapter` (NF4 dequantized, the adapter merged into the
weights): every mode runs on those weights, its mode 4 included.

Per mode: generated tokens/s and rows/s (wall time of the mode: tokenizing, generating, trimming;
loading excluded), rows in flight (row-steps / steps: the running batch's mean size), milliseconds
per decode step and the prefill share of the wall time (forward calls of one new position per row
are decode steps, the others prefill; the engine's own decode_seconds / prefill_seconds where it
keeps them), prefill efficiency (real prompt tokens / prompt positions computed, padding included),
decode efficiency (tokens kept in the responses / row-steps computed; a row-step is one row for one
generated position, so for `model.generate` it is rows x decode steps of the batch), overhead (the
share of wall time spent outside the model's forward calls), peak memory (CPU: the RSS high-water
mark, reset before each mode through /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated),
the share of the memory-bandwidth roof (on a GPU of known bandwidth: the bytes a decode step must
read -- the resident weights, and the KV cache of the rows' real tokens -- over the decode time, against
the GPU's peak), and how many rows give the same trimmed greedy response as mode 1 (the agreement).
Generated tokens are counted the same way in every mode: per row, the tokens up to and including the
one that ends it (EOS, the token completing a stop word, or the max_new_tokens-th), i.e. what the
engine generates; what `model.generate` computes past that (rows kept in a batch until its longest
row ends) is waste, and shows in the decode efficiency.

Every mode runs within `mode_budget` seconds (when set) and a failing mode is recorded as skipped
with its error, so one mode's failure (out of memory, a missing API) costs no other mode's figures.

The machine may be shared: before each mode the bench waits (up to `quiet_wait` s) while other
processes keep the CPU busy, and every mode records the share of the CPU other processes used while
it ran (column `others`; a warning names the distorted modes). On 2 cores a second busy process does
not cost half: torch's two OpenMP threads wait on each other at every op, and batched modes slowed
down 5-10x in such runs. The JSON is rewritten after every mode, so a stopped run keeps its figures.

The benchmark model is built locally in seconds, never downloaded (`model.dir`, rebuilt when missing
or when its settings change): a random-weight Llama with the test fixture's tokenizer, its decoder
weights replaced by their NF4 round trip (so float32, NF4 and vLLM's float32 compute the same
function and greedy outputs can be compared across them), and a random LoRA adapter (all seven
projections, non-zero B). Random weights never end an answer, so the output rows of `</s>` and of a
stop-word token are tilted toward the model's mean final hidden state, by an amount tuned so that
completions end at very different lengths (some after a few tokens, some at max_new_tokens).

  komt-batch bench                                  # jobs/bench.yaml
  komt-batch bench jobs/bench.yaml prompts=64 single_limit=16 variants=[float32] modes=[single,engine]
  komt-batch bench jobs/bench-gpu.yaml output=out/bench-gpu.json
"""

import batch.loading  # noqa: F401,I001 -- first: it quiets bitsandbytes' Hub-kernel notice before the bench imports peft (hence bitsandbytes)
from batch.bench.run import main

__all__ = ["main"]
