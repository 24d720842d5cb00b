"""Quantized runtime layers: int4 group-wise and int8 per-channel Linear replacements, and how a
saved quantized layer becomes one of them. The offline algorithms that produce them (round to
nearest, AWQ) live in leapllm.compression and import these."""
