"""komt-batch: offline batch generation with a 4-bit NF4 + LoRA causal LM.

A row's way through the package: config -> readers -> template -> plan -> engine -> stops -> writer,
driven by runner (the loop) and cli (the commands).
"""

import os

# pyarrow's allocator (mimalloc) keeps freed memory for a while before it gives it back; the job
# reads and writes many tables one after another (parts, slices, sort runs), and kept memory would
# count as resident. Read by mimalloc when pyarrow loads, so set before anything imports pyarrow.
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "0")

__version__ = "0.1.0"
