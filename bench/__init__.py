"""Bench scripts of vllm-armor: each one measures something and records it (`bench.common.record`).

Run them as modules from the repository root, e.g. `python -m bench.quality --help`; what they share lives in
`bench/common.py`.
"""
