"""`python -m vllm_neuronmlp.tools.cli`: the console script `vllm-neuronmlp`."""
import sys

from vllm_neuronmlp.tools.cli import main

sys.exit(main())
