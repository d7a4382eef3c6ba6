"""The PyTorch reference (torch_reference.py) in processes of its own, for benchmark.py.

PyTorch never shares the JAX process: on a GPU the two would share its memory and CUDA
libraries, and on the CPU PyTorch's step ran 6-30 % slower beside a compiled XLA program
(docs/performance.md). Imports no torch.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
from typing import Any

_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_reference.py")


def run_once(request: dict[str, Any], timeout_s: int) -> dict[str, Any]:
  """One benchmarks/torch_reference.py process timing its steps; {'skipped': why} on failure."""
  with tempfile.TemporaryDirectory() as tmp:
    spec_path, result_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
    with open(spec_path, "w") as f:
      json.dump(request, f)
    command = [sys.executable, _SCRIPT, f"--spec={spec_path}", f"--json={result_path}"]
    try:
      completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
      return {"skipped": f"torch reference (compile={request['compile_model']}) did not "
                         f"finish in {timeout_s} s."}
    if completed.stderr.strip():
      print(completed.stderr[-3000:], file=sys.stderr)
    if completed.returncode != 0 or not os.path.exists(result_path):
      return {"skipped": f"torch reference failed (exit {completed.returncode}): "
                         f"{completed.stderr.strip()[-500:]}"}
    with open(result_path) as f:
      return json.load(f)


class TorchStepServer:
  """A torch_reference.py --serve process: one timed step per `step()` call (eager, or
  torch.compile'd with the request's compile_model).

  For benchmark.py --interleave, which alternates these steps with its own JAX steps.
  """

  def __init__(self, request: dict[str, Any], timeout_s: float):
    self._timeout_s = timeout_s
    self._tmp = tempfile.TemporaryDirectory()
    spec_path = os.path.join(self._tmp.name, "spec.json")
    with open(spec_path, "w") as f:
      json.dump(request, f)
    self._process = subprocess.Popen(
        [sys.executable, _SCRIPT, f"--spec={spec_path}", "--serve"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
      # "ready compiled" / "ready eager": whether torch.compile served (see serve_steps).
      self.compiled = self._expect("ready").split()[-1] == "compiled"
    except RuntimeError:
      self.close()
      raise

  def _expect(self, what: str) -> str:
    # Replies are single lines, so nothing sits in the pipe's read buffer between them and
    # select() on the descriptor sees every reply.
    readable, _, _ = select.select([self._process.stdout], [], [], self._timeout_s)
    if not readable:
      self._process.kill()
      raise RuntimeError(f"torch reference server sent no {what} in {self._timeout_s} s; "
                         "killed.")
    line = self._process.stdout.readline().strip()
    if not line:
      code = self._process.wait(timeout=self._timeout_s)
      raise RuntimeError(f"torch reference server exited (code {code}) waiting for {what}; "
                         "its error is printed above.")
    if what == "ready" and line.split()[0] != "ready":
      raise RuntimeError(f"torch reference server said {line!r}, expected 'ready'.")
    return line

  def step(self, which: str = "step") -> float:
    """Seconds the server's step took, timed in the server: `which` is "step" (the whole
    step) or "model_step" (without the montage)."""
    try:
      self._process.stdin.write(f"{which}\n")
      self._process.stdin.flush()
    except BrokenPipeError:
      pass  # it has exited: _expect reads the end of its output and says so
    return float(self._expect("a step time"))

  def close(self) -> None:
    if self._process.poll() is None:
      try:
        self._process.stdin.write("stop\n")
        self._process.stdin.flush()
        self._process.wait(timeout=60)
      except (BrokenPipeError, subprocess.TimeoutExpired):
        self._process.kill()
        self._process.wait()
    for stream in (self._process.stdin, self._process.stdout):
      try:
        stream.close()
      except BrokenPipeError:
        pass
    self._tmp.cleanup()
