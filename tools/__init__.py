"""The offline half of vllm-neuronmlp (installed as `vllm_neuronmlp.tools`):
compression, evaluation, inspection and the embedded default model, behind the
`vllm-neuronmlp` console script. Imports run tools -> vllm_neuronmlp -> kernels."""

# Public API, imported lazily so `import vllm_neuronmlp.tools` stays cheap:
#   compress(src, out, ratio, **options) -> CompressResult      (tools/compressor.py)
#   evaluate(model, text="builtin:heldout", seq_len=2048, max_tokens=None, backend="vllm")
#   materialize_default_model(out, dtype="bfloat16", overwrite=False)
#   inspect_checkpoint(ckpt) -> dict                            (validated summary)
_LAZY = {
    "compress": ("vllm_neuronmlp.tools.compressor", "compress"),
    "CompressOptions": ("vllm_neuronmlp.tools.options", "CompressOptions"),
    "evaluate": ("vllm_neuronmlp.tools.evaluation.perplexity", "evaluate"),
    "materialize_default_model": ("vllm_neuronmlp.tools.data.default_model", "materialize"),
    "inspect_checkpoint": ("vllm_neuronmlp.tools.cli.inspect", "summarize"),
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'vllm_neuronmlp.tools' has no attribute {name!r}")
