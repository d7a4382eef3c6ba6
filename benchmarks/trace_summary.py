r"""Summarises a jax.profiler trace of the pretraining step by phase and op category.

  python benchmarks/trace_summary.py TRACE.json.gz HLO.txt.gz [--steps=3] [--top=40]

TRACE is the `perfetto_trace.json.gz` that `jax.profiler` writes (benchmarks/
profile_step.py copies it to DIR/trace.json.gz), HLO the compiled program's text. Each
device op in the trace is matched, by its `hlo_op` name, to its instruction in the HLO
(inside a CUDA graph: XLA's kernels by their name, cuBLAS kernels by their order,
`match_library_matmuls`):
  category  convolution (cuDNN or XLA), matmul (cuBLAS, Triton or XLA dot), reduction,
            elementwise, copy/transpose, collective, other;
  phase     montage (inside the montage's shard_map), backward (transpose of the JVP),
            forward (the model, loss and heads), other (optimizer, metrics), or
            "no metadata" (ops XLA made without op_name, e.g. weight-gradient convs),
read off the instruction (for a fusion, off the ops in its fused computation) and its
`op_name` metadata. Each matched op also gets the bytes of its operands and results and,
for convolutions and matmuls (cuDNN and cuBLAS calls included), its FLOPs, hence achieved
GB/s and TFLOP/s against the device's roofline (a fusion that re-reads an operand or reads
part of it moves more or less than that). On a CPU trace, XLA's asynchronous thunks
(convolutions, dots) trace only their launch; each is credited with the time no traced op
runs until its 'end: NAME' marker (`credit_in_flight`), and what is left is reported as
idle.
Pure Python: runs anywhere, on files fetched from a GPU machine too.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import math
import re
from typing import Any

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_CUSTOM_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_SOURCE = re.compile(r'source_file="([^"]*)"\s+source_line=(\d+)')
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+)\[([\d,]*)\]")
_DIM_LABELS = re.compile(r"dim_labels=\w+_(\w+)->")
_LHS_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_CUBLAS_CONTRACTING = re.compile(r'"lhs_contracting_dimensions":\[([^\]]*)\]')
_OPERAND = re.compile(r"%([\w.\-]+)")
COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter",
               "collective-permute", "ragged-all-to-all")
CATEGORIES = ("convolution", "matmul", "reduction", "elementwise", "copy/transpose",
              "collective", "other")
PHASES = ("montage", "forward", "backward", "other", "no metadata")


def _open_text(path: str) -> str:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return f.read()


def _split_shape_and_op(rest: str) -> tuple[str, str]:
  """'f32[2]{0} add(%a, %b), ...' -> (shape, 'add'); tuple shapes are parenthesised."""
  if rest.startswith("("):
    depth = 0
    for index, char in enumerate(rest):
      depth += char == "("
      depth -= char == ")"
      if depth == 0:
        shape, rest = rest[:index + 1], rest[index + 1:].lstrip()
        break
    else:
      return rest, ""
  else:
    shape, _, rest = rest.partition(" ")
  match = re.match(r"([\w\-$]+)\(", rest)
  return shape, match.group(1) if match else ""


def array_bytes(shape: str) -> int:
  """Bytes of all arrays in an HLO shape, e.g. '(f32[8]{0}, bf16[2,4]{1,0})' -> 48."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    bits = 8 if dtype == "pred" else int(re.search(r"\d+", dtype).group())
    total += math.prod(int(d) for d in dims.split(",") if d) * bits / 8
  return int(total)


def _first_dims(shape: str) -> list[int]:
  match = _ARRAY.search(shape)
  return [int(d) for d in match.group(2).split(",") if d] if match else []


def _operands(rest: str, opcode: str) -> list[str]:
  """Names inside the instruction's argument parentheses."""
  start = rest.find(opcode + "(")
  if start < 0:
    return []
  depth, index = 0, start + len(opcode)
  for index in range(start + len(opcode), len(rest)):
    depth += rest[index] == "("
    depth -= rest[index] == ")"
    if depth == 0:
      break
  return _OPERAND.findall(rest[start + len(opcode):index])


def parse_hlo(text: str) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
  """Instructions by name ({opcode, shape, op_name, calls, target, source, bytes, dims,
  computation, operand_dims, operand_bytes, kernel_labels, lhs_contracting, ...}) and each
  computation's opcodes. Operands are looked up in their own computation (parameter names
  repeat across computations)."""
  instructions: dict[str, dict[str, Any]] = {}
  computations: dict[str, list[str]] = collections.defaultdict(list)
  current = None
  scope: dict[str, dict[str, Any]] = {}  # this computation's instructions (names repeat)
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if match and " = " in line:
      name, rest = match.groups()
      shape, opcode = _split_shape_and_op(rest)
      op_name = _OP_NAME.search(rest)
      calls = _CALLS.search(rest)
      target = _CUSTOM_TARGET.search(rest)
      source = _SOURCE.search(rest)
      dim_labels = _DIM_LABELS.search(rest)
      contracting = _LHS_CONTRACTING.search(rest) or _CUBLAS_CONTRACTING.search(rest)
      operands = [scope[o] for o in _operands(rest, opcode) if o in scope]
      first_array = _ARRAY.search(shape)
      instructions[name] = scope[name] = {
          "opcode": opcode, "shape": shape[:120],
          # A library call's result tuple ends in its scratch space (u8): not moved data.
          "bytes": (array_bytes(first_array.group()) if opcode == "custom-call"
                    and first_array else array_bytes(shape)),
          "dims": _first_dims(shape), "computation": current,
          "operand_dims": [o["dims"] for o in operands],
          "operand_bytes": sum(o["bytes"] for o in operands),
          "kernel_labels": dim_labels.group(1) if dim_labels else None,
          "lhs_contracting": ([int(d.strip('" ')) for d in contracting.group(1).split(",")
                               if d.strip('" ')] if contracting else None),
          "op_name": op_name.group(1) if op_name else "",
          "calls": calls.group(1) if calls else None,
          "target": target.group(1) if target else None,
          "source": f"{source.group(1).split('/')[-1]}:{source.group(2)}" if source else "",
          "triton_gemm": "__triton_gemm" in rest or '"kind":"__triton' in rest,
          "cudnn": "__cudnn" in rest,
      }
      if current is not None:
        computations[current].append(opcode)
      continue
    match = _COMPUTATION.match(line)
    if match and "=" not in line.split("{")[0]:
      current = match.group(1)
      scope = {}
  return instructions, computations


def _conv_flops(info: dict[str, Any]) -> float:
  """2 x forward output elements x kernel elements / output features, read off whichever
  arrays the (forward or cuDNN backward) convolution takes and makes."""
  dims = info["operand_dims"][:2]
  if len(dims) < 2 or not info["kernel_labels"] or "o" not in info["kernel_labels"]:
    return 0.0
  target = info["target"] or ""
  if "BackwardInput" in target:
    output, kernel = dims[0], dims[1]
  elif "BackwardFilter" in target:
    output, kernel = dims[1], info["dims"]
  else:
    output, kernel = info["dims"], dims[1]
  if not output or len(kernel) != len(info["kernel_labels"]):
    return 0.0
  out_features = kernel[info["kernel_labels"].index("o")]
  return 2.0 * math.prod(output) * math.prod(kernel) / max(out_features, 1)


def _dot_flops(info: dict[str, Any]) -> float:
  """2 x output elements x contracted size (a dot or a cuBLAS matmul custom call)."""
  if not info["operand_dims"] or info["lhs_contracting"] is None:
    return 0.0
  lhs = info["operand_dims"][0]
  if any(axis >= len(lhs) for axis in info["lhs_contracting"]):
    return 0.0
  return 2.0 * math.prod(info["dims"]) * math.prod(lhs[a] for a in info["lhs_contracting"])


def op_flops(name: str, instructions: dict[str, dict[str, Any]],
             members: dict[str, list[dict[str, Any]]] | None = None) -> float:
  """Multiply-add FLOPs of a convolution or matmul (cuDNN / cuBLAS custom calls too), or of
  those inside a fusion (`members`: `computation_members`); 0 for other ops."""
  info = instructions.get(name)
  return 0.0 if info is None else _flops(info, members or {})


def _flops(info: dict[str, Any], members: dict[str, list[dict[str, Any]]]) -> float:
  target = (info["target"] or "").lower()
  if info["opcode"] == "convolution" or (info["opcode"] == "custom-call" and "conv" in target):
    return _conv_flops(info)
  if info["opcode"] == "dot" or (info["opcode"] == "custom-call"
                                 and ("gemm" in target or "matmul" in target)):
    return _dot_flops(info)
  if info["opcode"] == "fusion":
    return sum(_flops(member, {}) for member in members.get(info["calls"], [])
               if member["opcode"] in ("dot", "convolution"))
  return 0.0


def op_bytes(name: str, instructions: dict[str, dict[str, Any]]) -> int:
  """Bytes of an op's operands and results: what it moves if it reads each operand and
  writes each result once (more for ops that re-read, less for partial reads)."""
  info = instructions.get(name)
  if info is None:
    return 0
  return info["bytes"] + info["operand_bytes"]


def computation_members(instructions: dict[str, dict[str, Any]]
                        ) -> dict[str, list[dict[str, Any]]]:
  """Each computation's instructions (for the FLOPs of the convolutions and dots a fusion
  calls)."""
  members: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
  for info in instructions.values():
    members[info["computation"]].append(info)
  return members


def categorize(info: dict[str, Any] | None, computations: dict[str, list[str]]) -> str:
  if info is None:
    return "other"
  opcode = info["opcode"]
  target = (info["target"] or "").lower()
  if opcode in COLLECTIVES or any(opcode.startswith(c) for c in COLLECTIVES):
    return "collective"
  if opcode == "convolution" or "conv" in target:
    return "convolution"
  if opcode == "dot" or "gemm" in target or "matmul" in target or info["triton_gemm"]:
    return "matmul"
  if "xla.gpu.triton" in target:  # a Pallas kernel: the fused 1x1 conv, or the jitter
    return pallas_category(info["op_name"])
  if opcode in ("copy", "transpose", "copy-start", "copy-done"):
    return "copy/transpose"
  if opcode == "fusion":
    ops = computations.get(info["calls"] or "", [])
    if "convolution" in ops or (info["cudnn"] and "dot" not in ops):
      return "convolution"
    if "dot" in ops:
      return "matmul"
    if any(c in ops for c in ("reduce", "reduce-window", "select-and-scatter")):
      return "reduction"
    payload = [op for op in ops if op not in ("parameter", "bitcast", "constant", "tuple",
                                              "get-tuple-element")]
    if payload and all(op in ("copy", "transpose", "reshape", "slice", "concatenate",
                              "dynamic-slice", "dynamic-update-slice", "pad")
                       for op in payload):
      return "copy/transpose"
    return "elementwise"
  if opcode in ("reduce", "reduce-window", "select-and-scatter"):
    return "reduction"
  return "other"


# This package's Pallas kernels by the names a command buffer (CUDA graph) gives them,
# the kernel's rather than the instruction's: the 1x1 convs' (tcvm_jax/conv1x1_kernel.py)
# and the colour jitter's (tcvm_jax/jitter_kernel.py).
PALLAS_KERNEL_NAMES = ("conv1x1_stats", "_frame_kernel")


def pallas_category(name: str) -> str:
  """Category of one of this package's Pallas kernels from its op or kernel name: the
  fused 1x1 convs are matmuls ("conv" in their name notwithstanding), the rest
  elementwise."""
  return "matmul" if "conv1x1_stats" in name else "elementwise"


def kernel_category(kernel_name: str) -> str:
  """Category of a library (cuDNN, cuBLAS, PyTorch) kernel from its name: convolution,
  matmul, batch norm, copy/transpose or other (and this package's Pallas kernels'). XLA's
  own kernels are categorised from their HLO instead; PyTorch's profile
  (benchmarks/torch_profile.py) uses this too."""
  if kernel_name.startswith(PALLAS_KERNEL_NAMES):
    return pallas_category(kernel_name)
  lowered = kernel_name.lower()
  if any(k in lowered for k in ("fprop", "dgrad", "wgrad", "conv", "implicit_gemm", "cudnn",
                                "nhwc")):
    return "convolution"
  if any(k in lowered for k in ("gemm", "nvjet", "cutlass", "cublas", "xmma", "matmul")):
    return "matmul"
  if any(k in lowered for k in ("batch_norm", "batchnorm", "bn_")):
    return "batch norm"
  if "memcpy" in lowered or "memset" in lowered:
    return "copy/transpose"
  return "other"


def phase_of(op_name: str) -> str:
  if not op_name:
    return "no metadata"  # e.g. weight-gradient convolutions XLA created
  if "shard_map" in op_name or "montage" in op_name:
    return "montage"
  if "transpose(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "other"  # optimizer update, metrics


def _device_pids(events: list[dict[str, Any]]) -> set[Any]:
  """Processes of accelerator devices (none in a CPU trace)."""
  return {event["pid"] for event in events
          if event.get("ph") == "M" and event.get("name") == "process_name"
          and event["args"]["name"].startswith("/device:") and "CPU" not in event["args"]["name"]}


def device_op_events(trace: dict[str, Any]) -> list[dict[str, Any]]:
  """Complete events of device ops: GPU stream events where the trace has a device
  process, else (CPU) every event that names an HLO op."""
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  thread_names = {(event["pid"], event.get("tid")): event["args"]["name"] for event in events
                  if event.get("ph") == "M" and event.get("name") == "thread_name"}
  device_pids = _device_pids(events)
  op_events = [event for event in events
               if event.get("ph") == "X" and "hlo_op" in event.get("args", {})
               and not str(event.get("name", "")).startswith("end: ")]
  if not device_pids:
    return op_events
  on_device = [event for event in op_events if event["pid"] in device_pids]
  on_streams = [event for event in on_device
                if thread_names.get((event["pid"], event.get("tid")), "").startswith("Stream")]
  return on_streams or on_device


def credit_in_flight(op_events: list[dict[str, Any]], events: list[dict[str, Any]]
                     ) -> tuple[list[dict[str, Any]], float]:
  """CPU op events, each lengthened by the idle time it was still in flight; and the
  idle time (us) no op was in flight.

  XLA:CPU traces each thunk's execution; an asynchronous one (convolutions and dots run
  on the thread pool) returns at once and marks its completion with an 'end: NAME'
  event, so its own event covers only the launch (0.3 ms of the demo stem's ~16 ms
  convolution). Between launch and end marker it may also be queued while other ops
  run, so it is credited only with the time no traced op runs, shared equally among
  the ops in flight then. The durations then add up to at most the traced span.
  """
  ends: dict[str, list[float]] = collections.defaultdict(list)
  for event in events:
    name = str(event.get("name", ""))
    if event.get("ph") == "X" and name.startswith("end: "):
      ends[name[len("end: "):]].append(float(event["ts"]))
  for times in ends.values():
    times.sort()
  in_flight = []  # (launch returned, end marker, index)
  for index, event in enumerate(op_events):
    launched = float(event["ts"]) + float(event.get("dur", 0.0))
    times = ends.get(str(event.get("name", "")), [])
    position = bisect.bisect_left(times, float(event["ts"]))
    if position < len(times) and times[position] > launched:
      in_flight.append((launched, times[position], index))
  extra = [0.0] * len(op_events)
  gaps = _idle_spans(op_events)
  for gap_start, gap_stop in gaps:
    cuts = sorted({gap_start, gap_stop} | {t for a, b, _ in in_flight for t in (a, b)
                                           if gap_start < t < gap_stop})
    for piece_start, piece_stop in zip(cuts, cuts[1:]):
      owners = [i for a, b, i in in_flight if a <= piece_start and b >= piece_stop]
      for i in owners:
        extra[i] += (piece_stop - piece_start) / len(owners)
  idle = sum(stop - start for start, stop in gaps) - sum(extra)
  return [dict(event, dur=float(event.get("dur", 0.0)) + extra[i]) if extra[i] else event
          for i, event in enumerate(op_events)], idle


def _idle_spans(events: list[dict[str, Any]]) -> list[tuple[float, float]]:
  """The (start, stop) times within the events' span during which none of them runs."""
  spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events)
  gaps, end = [], spans[0][1] if spans else 0.0
  for start, stop in spans[1:]:
    if start > end:
      gaps.append((end, start))
    end = max(end, stop)
  return gaps


def match_library_matmuls(events: list[dict[str, Any]],
                          instructions: dict[str, dict[str, Any]],
                          by_kernel_name: dict[str, str], num_steps: int) -> dict[int, str]:
  """{id(event): cuBLAS call} for the cuBLAS kernels inside command buffers (CUDA graphs),
  which name no instruction. When there are exactly `num_steps` x (the program's cuBLAS
  calls) of them, the i-th of each step in time order is the i-th call in program order:
  XLA runs a GPU program's thunks in its schedule on one stream, one kernel per call.
  Otherwise (another count) nothing is matched and they stay "[library kernel] matmul"."""
  calls = [name for name, info in instructions.items()
           if info["opcode"] == "custom-call" and "cublas" in (info["target"] or "")]
  pending = sorted((event for event in events
                    if _names_no_instruction(event, instructions)
                    and str(event.get("name", "")) not in by_kernel_name
                    and kernel_category(str(event.get("name", ""))) == "matmul"),
                   key=lambda event: float(event.get("ts", 0.0)))
  if not calls or len(pending) != num_steps * len(calls):
    return {}
  return {id(event): calls[index % len(calls)] for index, event in enumerate(pending)}


def _names_no_instruction(event: dict[str, Any],
                          instructions: dict[str, dict[str, Any]]) -> bool:
  name = event["args"]["hlo_op"]
  return name not in instructions or instructions[name]["opcode"] == "command-buffer"


def summarize(trace_path: str, hlo_path: str, *, num_steps: int, top: int = 40
              ) -> dict[str, Any]:
  """Device time per step by phase x category, and the `top` ops by time."""
  with gzip.open(trace_path, "rt") as f:
    trace = json.load(f)
  instructions, computations = parse_hlo(_open_text(hlo_path))
  members = computation_members(instructions)
  events = device_op_events(trace)
  all_events = trace["traceEvents"] if isinstance(trace, dict) else trace
  if not _device_pids(all_events):  # a CPU trace
    events, idle_us = credit_in_flight(events, all_events)
  else:
    idle_us = sum(stop - start for start, stop in _idle_spans(events))
  # Inside a command buffer (a CUDA graph) every kernel reports the buffer as its hlo_op;
  # XLA's own kernels are named after their instruction ('.' and '-' made '_').
  by_kernel_name = {re.sub(r"[.\-]", "_", name): name for name in instructions}
  library_matmuls = match_library_matmuls(events, instructions, by_kernel_name, num_steps)
  per_op: dict[str, dict[str, Any]] = {}
  for event in events:
    name = event["args"]["hlo_op"]
    if _names_no_instruction(event, instructions):
      kernel = str(event.get("name", ""))
      name = by_kernel_name.get(kernel) or library_matmuls.get(
          id(event), f"[library kernel] {kernel_category(kernel)}")
    entry = per_op.setdefault(name, {"time_us": 0.0, "count": 0, "kernels": set()})
    entry["time_us"] += float(event.get("dur", 0.0))
    entry["count"] += 1
    entry["kernels"].add(str(event.get("name", ""))[:80])
  table = collections.defaultdict(float)
  moved = collections.defaultdict(float)  # (phase, category) -> bytes per step
  computed = collections.defaultdict(float)  # (phase, category) -> FLOPs per step
  unmatched = 0.0
  rows = []
  for name, entry in per_op.items():
    info = instructions.get(name)
    if info is None:
      unmatched += entry["time_us"]
    category = categorize(info, computations)
    if name.startswith("[library kernel] "):
      category = name.split("] ")[1]
      category = category if category in CATEGORIES else "other"  # e.g. batch norm
    phase = phase_of(info["op_name"]) if info else "no metadata"
    table[(phase, category)] += entry["time_us"]
    # A library call (cuDNN, cuBLAS) may launch several kernels; XLA's own ops launch one
    # per execution (ops in a loop body run once per iteration).
    runs = 1.0 if info is None or info["opcode"] == "custom-call" else entry["count"] / num_steps
    op_gb = op_bytes(name, instructions) * runs / 1e9
    op_tflop = op_flops(name, instructions, members) * runs / 1e12
    moved[(phase, category)] += op_gb
    computed[(phase, category)] += op_tflop
    seconds = entry["time_us"] / 1e6 / num_steps
    rows.append({"op": name, "ms_per_step": entry["time_us"] / 1e3 / num_steps,
                 "gb_per_step": op_gb, "tflop_per_step": op_tflop,
                 "gb_per_s": op_gb / seconds if seconds else 0.0,
                 "tflop_per_s": op_tflop / seconds if seconds else 0.0,
                 "launches_per_step": entry["count"] / num_steps, "category": category,
                 "phase": phase, "shape": info["shape"] if info else "",
                 "op_name": (info["op_name"][-110:] if info else ""),
                 "source": info["source"] if info else "",
                 "kernels": sorted(entry["kernels"])[:3]})
  rows.sort(key=lambda row: -row["ms_per_step"])
  total_ms = sum(table.values()) / 1e3 / num_steps
  by_phase = {phase: {category: table[(phase, category)] / 1e3 / num_steps
                      for category in CATEGORIES if table[(phase, category)]}
              for phase in PHASES}
  roofline = {phase: {category: {"ms": table[(phase, category)] / 1e3 / num_steps,
                                  "gb": moved[(phase, category)],
                                  "tflop": computed[(phase, category)]}
                       for category in CATEGORIES if table[(phase, category)]}
              for phase in PHASES}
  return {"num_steps": num_steps, "device_ms_per_step": total_ms,
          "launches_per_step": sum(e["count"] for e in per_op.values()) / num_steps,
          "unmatched_ms_per_step": unmatched / 1e3 / num_steps,
          "by_phase_ms": by_phase,
          "by_category_ms": {c: sum(by_phase[p].get(c, 0.0) for p in PHASES)
                             for c in CATEGORIES},
          "idle_ms_per_step": idle_us / 1e3 / num_steps,
          "roofline": roofline,
          "top_ops": rows[:top]}


def format_summary(summary: dict[str, Any]) -> str:
  lines = [f"device time per step: {summary['device_ms_per_step']:.2f} ms in "
           f"{summary['launches_per_step']:.0f} op launches "
           f"(unmatched to HLO: {summary['unmatched_ms_per_step']:.2f} ms)"]
  if "idle_ms_per_step" in summary:
    lines.append(f"no op running (between the traced ops): "
                 f"{summary['idle_ms_per_step']:.2f} ms per step")
  if "step_time_s" in summary:
    lines.append(f"wall step time (median): {summary['step_time_s'] * 1e3:.2f} ms")
  header = f"{'phase':<16}" + "".join(f"{c[:12]:>13}" for c in CATEGORIES) + f"{'total':>10}"
  lines.append(header)
  for phase in PHASES:
    values = summary["by_phase_ms"].get(phase, {})
    lines.append(f"{phase:<16}" + "".join(f"{values.get(c, 0.0):13.2f}" for c in CATEGORIES)
                 + f"{sum(values.values()):10.2f}")
  lines.append(f"{'all':<16}" + "".join(f"{summary['by_category_ms'][c]:13.2f}"
                                         for c in CATEGORIES)
               + f"{sum(summary['by_category_ms'].values()):10.2f}")
  if summary.get("roofline"):
    lines.append("rates of the ops matched to the HLO (GB: their operands and results; "
                 "TFLOP: convolutions and matmuls):")
    lines.append(f"  {'phase':<12}{'category':<16}{'ms':>8}{'GB':>9}{'GB/s':>8}"
                 f"{'TFLOP':>9}{'TFLOP/s':>9}")
    for phase in PHASES:
      for category, rates in summary["roofline"].get(phase, {}).items():
        seconds = rates["ms"] / 1e3
        lines.append(f"  {phase:<12}{category:<16}{rates['ms']:8.2f}{rates['gb']:9.3f}"
                     f"{rates['gb'] / seconds:8.0f}{rates['tflop']:9.4f}"
                     f"{rates['tflop'] / seconds:9.3f}")
  lines.append("top ops (ms/step, launches, category, phase, GB/s, TFLOP/s, source, shape, "
               "op_name):")
  for row in summary["top_ops"]:
    lines.append(f"  {row['ms_per_step']:7.3f} {row['launches_per_step']:4.0f} "
                 f"{row['category'][:11]:<11} {row['phase'][:8]:<8} "
                 f"{row.get('gb_per_s', 0.0):6.0f} {row.get('tflop_per_s', 0.0):7.3f} "
                 f"{row['source']:<22} {row['shape'][:40]:<40} {row['op_name'][-70:]}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("trace")
  parser.add_argument("hlo")
  parser.add_argument("--steps", type=int, default=3, help="Steps in the trace.")
  parser.add_argument("--top", type=int, default=40)
  args = parser.parse_args(argv)
  print(format_summary(summarize(args.trace, args.hlo, num_steps=args.steps, top=args.top)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
