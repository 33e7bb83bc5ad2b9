"""Start `vllm serve` on loopback and measure it with `vllm bench serve`.

Used by `make demo`, `benchmarks/serving.py` and the serve tests. The server is
always bound to 127.0.0.1 on a free port; its log goes to a file whose tail is
shown if it fails to start.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Dict, List, Optional, Sequence

DEFAULT_KV_CACHE_GIB = "2"


def vllm_executable() -> str:
    """The `vllm` command of the running interpreter's environment."""
    here = os.path.join(os.path.dirname(sys.executable), "vllm")
    return here if os.path.exists(here) else "vllm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """`with VllmServer(model, log_path) as server:` -> a ready server at server.url."""

    def __init__(self, model: str, log_path: str, served_name: str = "model", extra_args: Sequence[str] = (),
                 env: Optional[Dict[str, str]] = None, ready_timeout: float = 600, progress: bool = True) -> None:
        self.model, self.log_path, self.served_name = model, log_path, served_name
        self.progress = progress
        self.extra_args, self.ready_timeout = list(extra_args), ready_timeout
        self.env = {**os.environ,
                    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_CACHE_GIB),
                    **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def args(self) -> List[str]:
        return [vllm_executable(), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                "--served-model-name", self.served_name, *self.extra_args]

    def start(self) -> "VllmServer":
        self._log = open(self.log_path, "w")
        t0 = time.time()
        self.say(f"vllm serve {self.model}: starting (log {self.log_path})")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = t0 + self.ready_timeout
        next_note = t0 + 30
        while time.time() < deadline:
            if time.time() >= next_note:
                self.say(f"vllm serve {self.model}: still starting ({time.time() - t0:.0f} s)")
                next_note += 30
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve {self.model} exited with {self.proc.returncode}; "
                                   f"log {self.log_path}:\n{self.log_text(4000)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        self.say(f"vllm serve {self.model}: ready in {time.time() - t0:.0f} s at {self.url}")
                        return self
            except OSError:
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"vllm serve {self.model} not ready after {self.ready_timeout:.0f}s; "
                           f"log {self.log_path}:\n{self.log_text(4000)}")

    def say(self, line: str) -> None:
        if self.progress:
            print(line, file=sys.stderr, flush=True)

    def log_text(self, last_chars: Optional[int] = None) -> str:
        if getattr(self, "_log", None):
            self._log.flush()
        with open(self.log_path) as f:
            text = f.read()
        return text[-last_chars:] if last_chars else text

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self) -> "VllmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def bench_serve(server: VllmServer, tokenizer: str, num_prompts: int = 64, input_len: int = 256,
                output_len: int = 128, concurrency: int = 16, seed: int = 0, timeout: float = 3600) -> dict:
    """One `vllm bench serve` run (random dataset, --ignore-eos); returns its result JSON."""
    t0 = time.time()
    server.say(f"vllm bench serve: {num_prompts} prompts, {input_len} in / {output_len} out, "
                f"concurrency {concurrency} ...")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [vllm_executable(), "bench", "serve", "--backend", "vllm", "--base-url", server.url,
               "--model", server.served_name, "--tokenizer", tokenizer, "--dataset-name", "random",
               "--random-input-len", str(input_len), "--random-output-len", str(output_len),
               "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
               "--seed", str(seed), "--save-result", "--result-dir", tmp, "--result-filename", "bench.json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        with open(os.path.join(tmp, "bench.json")) as f:
            result = json.load(f)
    server.say(f"vllm bench serve: done in {time.time() - t0:.0f} s")
    return result


BENCH_KEYS = ("completed", "failed", "total_output_tokens", "duration", "output_throughput",
              "mean_tpot_ms", "median_tpot_ms", "mean_ttft_ms", "median_ttft_ms")


def summarize_bench(result: dict) -> dict:
    return {k: result.get(k) for k in BENCH_KEYS}
