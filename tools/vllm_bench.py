"""Mode 8 of `komt-batch bench`: vLLM's LLM.generate on the bench model, run by vLLM's own python.

vLLM pins transformers<5.20 (this project needs >=5.20), so it lives in its own virtual environment
and batch/bench/modes.py (run_vllm) runs this script as a subprocess with that environment's python
(the bench file's `vllm_python`, else $KOMT_VLLM_PYTHON; how to install it: docs/performance.md, the
vLLM peer):

    $KOMT_VLLM_PYTHON tools/vllm_bench.py REQUEST.json > RESULT.json

REQUEST.json: {"model": DIR, "adapter": DIR or null, "lora_rank": 8, "prompts": [[token ids]],
"max_new_tokens": N, "stop": [...], "max_model_len": N, "kv_cache_bytes": N, "dtype": "float32",
"prefix_caching": false}.
Stdout gets exactly one JSON object: {"outputs": [[generated token ids]], "load_seconds",
"generate_seconds", "peak_rss_bytes", "vllm_version", "threads"}; everything vLLM prints goes to stderr.
Greedy (temperature 0), prefix caching as the request says (off by default: the same prompts repeated would
otherwise be free; on for a workload of shared prompt prefixes), eager
mode (no compile), the KV cache sized explicitly (docs/performance.md says why).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


class PeakRss:
    """Samples the summed RSS of this process and all its descendants (vLLM's engine core runs in a
    child process) every 50 ms; `peak` is the highest sum seen."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        import psutil

        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.sample()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def busy_cpu_seconds() -> float:
    fields = open("/proc/stat").readline().split()[1:9]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(proc) -> float:
    import psutil

    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def end_with_parent() -> None:
    """Die with the bench (PR_SET_PDEATHSIG), and take vLLM's engine processes along on SIGTERM:
    they do not notice on their own when this process goes, and would keep a core busy."""
    import ctypes
    import signal

    import psutil

    def stop(signum, frame):
        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
        os._exit(128 + signum)

    with_libc = ctypes.CDLL("libc.so.6", use_errno=True)
    with_libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the parent exits
    if os.getppid() == 1:
        os._exit(1)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return stop


def main() -> int:
    stop = end_with_parent()
    request = json.loads(open(sys.argv[1], encoding="utf-8").read())
    result_fd = os.dup(1)  # stdout is for the result only: vLLM (and its children) print to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, request["kv_cache_bytes"] // 1024**3)))
    peak = PeakRss()
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    lora = None
    kwargs = {}
    if request.get("adapter"):
        from vllm.lora.request import LoRARequest

        kwargs.update(enable_lora=True, max_lora_rank=request.get("lora_rank", 8), max_loras=1)
        lora = LoRARequest("bench", 1, request["adapter"])
    llm = LLM(
        model=request["model"], tokenizer=request["model"], dtype=request.get("dtype", "float32"), enforce_eager=True,
        max_model_len=request["max_model_len"], enable_prefix_caching=bool(request.get("prefix_caching")), seed=0,
        kv_cache_memory_bytes=request["kv_cache_bytes"], **kwargs,
    )
    import signal

    signal.signal(signal.SIGTERM, stop)  # again: vLLM may have installed its own handlers
    signal.signal(signal.SIGINT, stop)
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"], stop=request["stop"],
                            skip_special_tokens=False, spaces_between_special_tokens=False)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    load_seconds = time.perf_counter() - t0
    busy0, own0, load0 = busy_cpu_seconds(), tree_cpu_seconds(peak.proc), os.getloadavg()[0]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
    generate_seconds = time.perf_counter() - start
    own = tree_cpu_seconds(peak.proc) - own0
    others = (busy_cpu_seconds() - busy0 - own) / (generate_seconds * (os.cpu_count() or 1))
    cpu = {"own_cpu_seconds": round(own, 2), "own_cores_used": round(own / generate_seconds, 2),
           "others_cpu_share": round(min(max(others, 0.0), 1.0), 3), "load_average": [round(load0, 2), round(os.getloadavg()[0], 2)],
           "cores": len(os.sched_getaffinity(0))}
    result = {
        "outputs": [list(o.outputs[0].token_ids) for o in outputs],
        "finish_reasons": [o.outputs[0].finish_reason for o in outputs],
        "load_seconds": round(load_seconds, 3), "generate_seconds": generate_seconds,
        "peak_rss_bytes": peak.stop(), "vllm_version": vllm.__version__,
        "threads": os.environ.get("OMP_NUM_THREADS") or os.environ.get("VLLM_CPU_OMP_THREADS_BIND"), "cpu": cpu,
    }
    with os.fdopen(result_fd, "w") as out:
        json.dump(result, out)
    del llm  # shuts the engine core process down
    return 0


if __name__ == "__main__":
    sys.exit(main())
