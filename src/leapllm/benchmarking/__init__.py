"""`leapllm bench`: leapllm against its peers (transformers, llama.cpp) on the same model file.

systems.py  one class per system (leapllm, Hugging Face transformers, llama.cpp), same interface
worker.py   a process that loads one system and answers JSON-line measurement requests
harness.py  the orchestrator: one worker per system, interleaved repeats, medians, quality check
report.py   the tables (terminal, markdown) and the JSON file
"""
