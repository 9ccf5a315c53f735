"""komt-batch: offline batch generation with a 4-bit NF4 + LoRA causal LM.

A row's way through the package: config -> readers -> template -> plan -> engine -> stops -> writer,
driven by runner (the loop) and cli (the commands).
"""

__version__ = "0.1.0"
