"""svd_neuron checkpoints on Trainium through vllm-neuron's native line (docs/trainium.md).

vllm-neuron never builds vLLM's model classes, so our vLLM quantization method is never
called there. Instead, when vllm-neuron is the active platform, `integrate.install()`
(run by our `vllm.general_plugins` entry point) makes its stock Llama / Qwen3 models load
an svd_neuron checkpoint with each listed MLP replaced by `mlp.SVDNeuronMLP`, whose
factors are sharded for tensor parallelism by `sharding.py` and named after their
checkpoint tensors (`names.py`); on vllm-neuron 0.2.x, or a layout we do not recognise,
svd_neuron checkpoints are refused with a message naming the stack (`stack.py`).

Nothing here imports vllm-neuron or the Neuron SDK at import time.
"""
