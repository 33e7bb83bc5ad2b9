"""vllm-neuronmlp: SVD-compressed MLPs served by vLLM (quantization `svd_neuron`).

`register()` is the `vllm.general_plugins` entry point. vLLM calls it in every
process it starts (API server, engine core, each worker), so it is idempotent and
cheap: it registers the quantization config class and, only when vllm-neuron is
installed, installs the Trainium model variant or its refusal (vllm_neuronmlp/neuron/).
"""
__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Register the `svd_neuron` quantization method with vLLM (idempotent); on
    vllm-neuron, also hook our model variant into it (a no-op without vllm-neuron)."""
    global _registered
    if _registered:
        return
    from vllm_neuronmlp.neuron.integrate import install as install_on_neuron
    from vllm_neuronmlp.quant_config import register_with_vllm

    register_with_vllm()
    install_on_neuron()
    _registered = True


_HF_QUANTIZER_REGISTRY = "transformers.quantizers.auto"


def _register_with_transformers() -> None:
    import sys

    loading = sys.modules.get("vllm_neuronmlp.hf_quantizer")
    if loading is not None and not hasattr(loading, "register_with_transformers"):
        return  # hf_quantizer is importing transformers right now; it registers itself at its end
    from vllm_neuronmlp.hf_quantizer import register_with_transformers

    register_with_transformers()


def _install_transformers_hook() -> None:
    """`import vllm_neuronmlp` makes transformers' from_pretrained load svd_neuron
    checkpoints without importing transformers (or torch) itself: our quantizer joins
    transformers' registry right after that registry module loads."""
    from vllm_neuronmlp.import_hooks import call_after_import

    call_after_import(_HF_QUANTIZER_REGISTRY, lambda _module: _register_with_transformers())


_install_transformers_hook()
