import os
import sys

# Tests import their helpers (model_factory, vllm_runner) by plain name.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
