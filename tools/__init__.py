"""The offline half of vllm-neuronmlp (installed as `vllm_neuronmlp.tools`):
compression, evaluation, inspection and the embedded default model, behind the
`vllm-neuronmlp` console script. Imports run tools -> vllm_neuronmlp -> kernels."""
