"""NKI kernels of the NeuronMLP/NeuronMM papers (installed as
`vllm_neuronmlp.kernels`). They import NKI only through `nki_compat`, which picks
the real Neuron SDK when it is importable and the project's CPU emulator
(`sim`) otherwise. Nothing here imports the plugin or the tool."""
