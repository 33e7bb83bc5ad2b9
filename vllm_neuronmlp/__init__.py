"""vllm-neuronmlp: SVD-compressed MLPs served by vLLM (quantization `svd_neuron`).

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in every
process it starts (API server, engine core, each worker), so it is idempotent and
cheap: it only registers the quantization config class.
"""
__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the `svd_neuron` quantization method with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm_neuronmlp.quant_config import register_with_vllm

    register_with_vllm()
    _registered = True


def _register_with_transformers() -> None:
    # `import vllm_neuronmlp` makes transformers' from_pretrained load svd_neuron
    # checkpoints. Skipped where transformers is absent (the kernels need only numpy).
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    from vllm_neuronmlp.hf_quantizer import register_with_transformers

    register_with_transformers()


_register_with_transformers()
