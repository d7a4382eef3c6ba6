"""benchmarks/trace_summary.py and benchmarks/profile_step.py: the profile of the step."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from benchmarks import trace_summary  # pylint: disable=g-import-not-at-top

# A hand-written compiled program in XLA's text format: what each op is and where it came
# from (op_name metadata) is all the summary reads.
HLO_TEXT = """\
HloModule jit_train_step, entry_computation_layout={()->()}

%fused_conv (p0: bf16[8,4,4,3], p1: bf16[3,3,3,8]) -> bf16[8,4,4,8] {
  %p0 = bf16[8,4,4,3]{3,2,1,0} parameter(0)
  %p1 = bf16[3,3,3,8]{3,2,1,0} parameter(1)
  ROOT %convolution.1 = bf16[8,4,4,8]{3,2,1,0} convolution(%p0, %p1), window={size=3x3}, dim_labels=b01f_01io->b01f
}

%fused_reduce (p0: bf16[8,4,4,8]) -> f32[8] {
  %p0 = bf16[8,4,4,8]{3,2,1,0} parameter(0)
  %convert.1 = f32[8,4,4,8]{3,2,1,0} convert(%p0)
  %c = f32[] constant(0)
  ROOT %reduce.1 = f32[8]{0} reduce(%convert.1, %c), dimensions={0,1,2}, to_apply=%add
}

%fused_relu (p0: bf16[8,4,4,8]) -> bf16[8,4,4,8] {
  %p0 = bf16[8,4,4,8]{3,2,1,0} parameter(0)
  %z = bf16[] constant(0)
  %b = bf16[8,4,4,8]{3,2,1,0} broadcast(%z), dimensions={}
  ROOT %maximum.1 = bf16[8,4,4,8]{3,2,1,0} maximum(%p0, %b)
}

%fused_transpose (p0: f32[4,8]) -> f32[8,4] {
  %p0 = f32[4,8]{1,0} parameter(0)
  ROOT %transpose.1 = f32[8,4]{1,0} transpose(%p0), dimensions={1,0}
}

%fused_dot (p0: bf16[128,8], p1: bf16[8,16]) -> bf16[128,16] {
  %p0 = bf16[128,8]{1,0} parameter(0)
  %p1 = bf16[8,16]{1,0} parameter(1)
  ROOT %dot.1 = bf16[128,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: bf16[8,4,4,3], k: bf16[3,3,3,8]) -> f32[8] {
  %a = bf16[8,4,4,3]{3,2,1,0} parameter(0)
  %k = bf16[3,3,3,8]{3,2,1,0} parameter(1)
  %all-to-all.1 = bf16[8,4,4,3]{3,2,1,0} all-to-all(%a), dimensions={0}, metadata={op_name="jit(train_step)/jit(video_montage)/shard_map/all_to_all"}
  %conv_fusion.1 = bf16[8,4,4,8]{3,2,1,0} fusion(%all-to-all.1, %k), kind=kCustom, calls=%fused_conv, metadata={op_name="jit(train_step)/jvp()/conv_general_dilated" source_file="/x/layers.py" source_line=61}
  %cudnn-conv-bw-filter.2 = (bf16[3,3,3,8]{3,2,1,0}, u8[4096]{0}) custom-call(%a, %conv_fusion.1), window={size=3x3}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(train_step)/transpose(jvp())/conv_general_dilated"}
  %input_reduce_fusion.3 = f32[8]{0} fusion(%conv_fusion.1), kind=kInput, calls=%fused_reduce, metadata={op_name="jit(train_step)/jvp()/reduce_sum"}
  %loop_maximum_fusion.4 = bf16[8,4,4,8]{3,2,1,0} fusion(%conv_fusion.1), kind=kLoop, calls=%fused_relu, metadata={op_name="jit(train_step)/transpose(jvp())/max"}
  %gemm_fusion.5 = bf16[128,16]{1,0} fusion(%loop_maximum_fusion.4, %k), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(train_step)/jvp(bthwc,cd->bthwd)/dot_general"}
  %transpose_fusion.6 = f32[8,4]{1,0} fusion(%input_reduce_fusion.3), kind=kLoop, calls=%fused_transpose, metadata={op_name="jit(train_step)/sgd/transpose"}
  %copy.7 = f32[8]{0} copy(%input_reduce_fusion.3)
  ROOT %tuple.8 = (f32[8]{0}) tuple(%copy.7)
}
"""

# (hlo_op reported by the profiler, kernel name, duration in us, expected phase, category).
# Kernels inside a command buffer (a CUDA graph) all report the buffer as their hlo_op;
# XLA's own kernels are named after their instruction with '.' and '-' made '_'.
EVENTS = [
    ("all-to-all.1", "ncclDevKernel_AllToAll", 40.0, "montage", "collective"),
    ("conv_fusion.1", "sm90_xmma_fprop_implicit_gemm_bf16", 300.0, "forward", "convolution"),
    ("cudnn-conv-bw-filter.2", "sm90_xmma_wgrad_implicit_gemm", 200.0, "backward",
     "convolution"),
    ("command_buffer_3", "input_reduce_fusion_3", 50.0, "forward", "reduction"),
    ("command_buffer_3", "loop_maximum_fusion_4", 25.0, "backward", "elementwise"),
    ("command_buffer_3", "gemm_fusion_5", 70.0, "forward", "matmul"),
    ("command_buffer_3", "transpose_fusion_6", 5.0, "other", "copy/transpose"),
    ("copy.7", "copy_7", 3.0, "no metadata", "copy/transpose"),
    ("command_buffer_3", "nvjet_sm90_tst_128x128_64x6", 90.0, "no metadata", "matmul"),
    ("command_buffer_3", "sm90_xmma_dgrad_implicit_gemm_bf16", 60.0, "no metadata",
     "convolution"),
]


def _write_trace(path: str, events, num_steps: int) -> None:
  trace_events = [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name",
       "args": {"name": "Stream #7(Compute)"}},
      {"ph": "M", "pid": 1, "tid": 9, "name": "thread_name", "args": {"name": "XLA Ops"}},
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
  ]
  time_us = 0.0
  for _ in range(num_steps):
    for hlo_op, kernel, duration, _, _ in events:
      args = {"hlo_op": hlo_op, "hlo_module": "jit_train_step"}
      trace_events.append({"ph": "X", "pid": 1, "tid": 7, "ts": time_us, "dur": duration,
                           "name": kernel, "args": args})
      # The same op on a derived line and a host-side launch must not be counted again.
      trace_events.append({"ph": "X", "pid": 1, "tid": 9, "ts": time_us, "dur": duration,
                           "name": hlo_op, "args": args})
      trace_events.append({"ph": "X", "pid": 2, "tid": 1, "ts": time_us, "dur": 1.0,
                           "name": "cuLaunchKernel", "args": args})
      time_us += duration + 1.0
  with gzip.open(path, "wt") as f:
    json.dump({"displayTimeUnit": "ns", "traceEvents": trace_events}, f)


def test_parse_hlo_reads_opcodes_metadata_and_fused_computations():
  instructions, computations = trace_summary.parse_hlo(HLO_TEXT)
  assert instructions["conv_fusion.1"]["opcode"] == "fusion"
  assert instructions["conv_fusion.1"]["calls"] == "fused_conv"
  assert instructions["conv_fusion.1"]["source"] == "layers.py:61"
  assert instructions["cudnn-conv-bw-filter.2"]["target"] == "__cudnn$convBackwardFilter"
  assert instructions["cudnn-conv-bw-filter.2"]["shape"].startswith("(bf16[3,3,3,8]")
  assert instructions["all-to-all.1"]["op_name"].endswith("shard_map/all_to_all")
  assert instructions["copy.7"]["op_name"] == ""
  assert "reduce" in computations["fused_reduce"]
  assert computations["fused_relu"] == ["parameter", "constant", "broadcast", "maximum"]


def test_summary_attributes_each_kernel_to_its_phase_and_category(tmp_path):
  num_steps = 2
  trace_path, hlo_path = str(tmp_path / "trace.json.gz"), str(tmp_path / "hlo.txt")
  _write_trace(trace_path, EVENTS, num_steps)
  with open(hlo_path, "w") as f:
    f.write(HLO_TEXT)
  summary = trace_summary.summarize(trace_path, hlo_path, num_steps=num_steps)

  expected: dict[tuple[str, str], float] = {}
  for _, _, duration, phase, category in EVENTS:
    expected[(phase, category)] = expected.get((phase, category), 0.0) + duration / 1e3
  got = {(phase, category): ms for phase, values in summary["by_phase_ms"].items()
         for category, ms in values.items()}
  assert got.keys() == expected.keys()
  for key, ms in expected.items():
    assert got[key] == pytest.approx(ms), key
  total_ms = sum(duration for *_, duration, _, _ in EVENTS) / 1e3
  assert summary["device_ms_per_step"] == pytest.approx(total_ms)
  assert summary["launches_per_step"] == len(EVENTS)
  # Only the two library kernels inside the command buffer have no instruction.
  assert summary["unmatched_ms_per_step"] == pytest.approx((90.0 + 60.0) / 1e3)
  top = summary["top_ops"][0]
  assert (top["op"], top["category"], top["phase"]) == ("conv_fusion.1", "convolution",
                                                         "forward")
  assert top["ms_per_step"] == pytest.approx(0.3)
  text = trace_summary.format_summary(summary)
  assert "montage" in text and "conv_fusion.1" not in text.splitlines()[0]


def test_array_bytes_counts_every_array_of_a_shape():
  assert trace_summary.array_bytes("(f32[8]{0}, bf16[2,4]{1,0})") == 8 * 4 + 8 * 2
  assert trace_summary.array_bytes("pred[3,3]{1,0}") == 9
  assert trace_summary.array_bytes("s8[32,28,28,64]{3,2,1,0}") == 32 * 28 * 28 * 64
  assert trace_summary.array_bytes("u8[0]{0}") == 0
  assert trace_summary.array_bytes("f32[]") == 4


def test_bytes_and_flops_of_convolutions_matmuls_and_fusions():
  instructions, _ = trace_summary.parse_hlo(HLO_TEXT)
  members = trace_summary.computation_members(instructions)
  # A 3x3 conv over 3 channels to 8 on 8 frames of 4x4: 2 FLOPs per multiply-add, one
  # per output element, kernel tap and input channel.
  conv_flops = 2 * (8 * 4 * 4 * 8) * (3 * 3 * 3)
  assert trace_summary.op_flops("conv_fusion.1", instructions, members) == conv_flops
  # Its weight gradient (cuDNN: operands input and output gradient, result the kernel)
  # costs the same.
  assert trace_summary.op_flops("cudnn-conv-bw-filter.2", instructions) == conv_flops
  assert trace_summary.op_flops("gemm_fusion.5", instructions, members) == 2 * 128 * 16 * 8
  assert trace_summary.op_flops("input_reduce_fusion.3", instructions, members) == 0
  # A cuDNN call's result: the kernel gradient, not its scratch space (u8).
  assert trace_summary.op_bytes("cudnn-conv-bw-filter.2", instructions) == (
      8 * 4 * 4 * 3 + 8 * 4 * 4 * 8 + 3 * 3 * 3 * 8) * 2
  # Bytes: its bf16 operand (8*4*4*8 elements) and f32[8] result.
  assert trace_summary.op_bytes("input_reduce_fusion.3", instructions) == 8 * 4 * 4 * 8 * 2 + 32
  assert trace_summary.op_bytes("gemm_fusion.5", instructions) == (128 * 8 + 3 * 3 * 3 * 8
                                                                   + 128 * 16) * 2


def test_summary_reports_achieved_rates(tmp_path):
  trace_path, hlo_path = str(tmp_path / "trace.json.gz"), str(tmp_path / "hlo.txt")
  _write_trace(trace_path, EVENTS, num_steps=2)
  with open(hlo_path, "w") as f:
    f.write(HLO_TEXT)
  summary = trace_summary.summarize(trace_path, hlo_path, num_steps=2)
  rows = {row["op"]: row for row in summary["top_ops"]}
  conv = rows["conv_fusion.1"]  # 300 us per step
  assert conv["tflop_per_step"] == pytest.approx(2 * 8 * 4 * 4 * 8 * 27 / 1e12)
  assert conv["tflop_per_s"] == pytest.approx(conv["tflop_per_step"] / 300e-6)
  reduce_bytes = 8 * 4 * 4 * 8 * 2 + 32
  assert rows["input_reduce_fusion.3"]["gb_per_s"] == pytest.approx(reduce_bytes / 50e-6 / 1e9)
  forward = summary["roofline"]["forward"]
  assert forward["reduction"]["gb"] == pytest.approx(reduce_bytes / 1e9)
  assert forward["reduction"]["ms"] == pytest.approx(0.05)
  assert forward["convolution"]["tflop"] == pytest.approx(conv["tflop_per_step"])
  text = trace_summary.format_summary(summary)
  assert "TFLOP/s" in text and "GB/s" in text


# Two cuBLAS calls (program order: forward, then backward) whose kernels run inside a
# command buffer, where the profiler names the buffer, not the call.
CUBLAS_HLO_TEXT = HLO_TEXT.replace("  %copy.7 = f32[8]{0} copy(%input_reduce_fusion.3)\n", """\
  %cublas-gemm.8 = (bf16[128,16]{1,0}, s8[1024]{0}) custom-call(%gemm_fusion.5, %k), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}, metadata={op_name="jit(train_step)/jvp()/dot_general"}
  %cublas-gemm.9 = (bf16[128,8]{1,0}, s8[1024]{0}) custom-call(%gemm_fusion.5, %k), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}, metadata={op_name="jit(train_step)/transpose(jvp())/dot_general"}
  %copy.7 = f32[8]{0} copy(%input_reduce_fusion.3)
""")


@pytest.mark.parametrize("extra_kernels, matched", [(0, True), (1, False)])
def test_cublas_kernels_in_command_buffers_are_matched_in_program_order(
    tmp_path, extra_kernels, matched):
  events = [event for event in EVENTS if not event[1].startswith("nvjet")] + [
      ("command_buffer_4", "nvjet_sm90_tst_128x128_64x6_NNT", 90.0, "forward", "matmul"),
      ("command_buffer_4", "nvjet_sm90_tst_64x64_64x13_TNT", 40.0, "backward", "matmul")]
  trace_path, hlo_path = str(tmp_path / "trace.json.gz"), str(tmp_path / "hlo.txt")
  _write_trace(trace_path, events + [
      ("command_buffer_4", "nvjet_sm90_extra", 10.0, "no metadata", "matmul")] * extra_kernels,
      num_steps=2)
  with open(hlo_path, "w") as f:
    f.write(CUBLAS_HLO_TEXT)
  summary = trace_summary.summarize(trace_path, hlo_path, num_steps=2, top=100)
  rows = {row["op"]: row for row in summary["top_ops"]}
  if matched:
    assert rows["cublas-gemm.8"]["ms_per_step"] == pytest.approx(0.09)
    assert rows["cublas-gemm.8"]["phase"] == "forward"
    # (128, 16) x (16, 16): 2 x output elements x contracted size.
    assert rows["cublas-gemm.8"]["tflop_per_step"] == pytest.approx(2 * 128 * 16 * 16 / 1e12)
    assert rows["cublas-gemm.9"]["ms_per_step"] == pytest.approx(0.04)
    assert rows["cublas-gemm.9"]["phase"] == "backward"
    assert "[library kernel] matmul" not in rows
  else:  # one kernel too many per step: no guess, all stay unmatched library matmuls
    assert "cublas-gemm.8" not in rows
    assert rows["[library kernel] matmul"]["ms_per_step"] == pytest.approx(0.14)


@pytest.mark.parametrize("kernel, category", [
    # Names seen in the H200 traces of the JAX and PyTorch steps.
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "convolution"),
    ("sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32", "convolution"),
    ("void nhwcAddPaddingKernel<__nv_bfloat16, __nv_bfloat16, float, true>", "convolution"),
    ("nvjet_sm90_tst_64x64_64x13_1x2_h_bz_splitK_NTT", "matmul"),
    ("void at::native::batch_norm_backward_reduce_channels_last_kernel<4, c10::BFloat16>",
     "batch norm"),
    ("Memset 3", "copy/transpose"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add>",
     "other"),
    # Pallas kernels inside a command buffer (2026-11-27 H200 trace with conv1x1_kernel).
    ("conv1x1_stats__7", "matmul"),
    ("conv1x1_stats_input_grad__2", "matmul"),
    ("_frame_kernel", "elementwise"),
])
def test_library_kernels_are_categorised_by_name(kernel, category):
  assert trace_summary.kernel_category(kernel) == category


def test_cpu_trace_without_a_device_process_counts_every_op_once(tmp_path):
  trace_path, hlo_path = str(tmp_path / "trace.json.gz"), str(tmp_path / "hlo.txt")
  with open(hlo_path, "w") as f:
    f.write(HLO_TEXT)
  events = [{"ph": "M", "pid": 3, "name": "process_name", "args": {"name": "/host:CPU"}}]
  for index, name in enumerate(("conv_fusion.1", "input_reduce_fusion.3")):
    events.append({"ph": "X", "pid": 3, "tid": index, "ts": 0.0, "dur": 100.0, "name": name,
                   "args": {"hlo_op": name}})
    events.append({"ph": "X", "pid": 3, "tid": index, "ts": 100.0, "dur": 0.5,
                   "name": f"end: {name}", "args": {"hlo_op": name}})
  with gzip.open(trace_path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  summary = trace_summary.summarize(trace_path, hlo_path, num_steps=1)
  assert summary["device_ms_per_step"] == pytest.approx(0.2)
  assert summary["by_phase_ms"]["forward"] == pytest.approx(
      {"convolution": 0.1, "reduction": 0.1})


def test_cpu_async_ops_are_credited_with_the_idle_time_until_their_end_marker(tmp_path):
  # XLA:CPU's asynchronous thunks (convolutions, dots) trace only their launch and mark
  # completion with an 'end: NAME' event. Times in us:
  #   conv_fusion.1          launch [0, 10], end marker at 100
  #   input_reduce_fusion.3  [50, 70], runs while the conv is in flight
  #   gemm_fusion.5          launch [70, 75], end marker at 110 (in flight with the conv)
  #   loop_maximum_fusion.4  [130, 135]
  # Idle (no traced op): [10, 50] -> conv alone; [75, 100] -> conv and gemm, half each;
  # [100, 110] -> gemm alone; [110, 130] -> nobody (left idle).
  trace_path, hlo_path = str(tmp_path / "trace.json.gz"), str(tmp_path / "hlo.txt")
  with open(hlo_path, "w") as f:
    f.write(HLO_TEXT)
  events = [{"ph": "M", "pid": 3, "name": "process_name", "args": {"name": "/host:CPU"}}]
  for name, start, duration, end in (("conv_fusion.1", 0, 10, 100),
                                     ("input_reduce_fusion.3", 50, 20, None),
                                     ("gemm_fusion.5", 70, 5, 110),
                                     ("loop_maximum_fusion.4", 130, 5, None)):
    events.append({"ph": "X", "pid": 3, "tid": 1, "ts": float(start), "dur": float(duration),
                   "name": name, "args": {"hlo_op": name}})
    events.append({"ph": "X", "pid": 3, "tid": 1, "ts": float(end or start + duration),
                   "dur": 0.2, "name": f"end: {name}", "args": {}})
  with gzip.open(trace_path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  summary = trace_summary.summarize(trace_path, hlo_path, num_steps=1)
  ms = {row["op"]: row["ms_per_step"] for row in summary["top_ops"]}
  assert ms["conv_fusion.1"] == pytest.approx((10 + 40 + 12.5) / 1e3)
  assert ms["gemm_fusion.5"] == pytest.approx((5 + 12.5 + 10) / 1e3)
  assert ms["input_reduce_fusion.3"] == pytest.approx(0.02)
  assert summary["idle_ms_per_step"] == pytest.approx(0.02)
  # Every microsecond of the span is either an op's or idle.
  assert summary["device_ms_per_step"] + summary["idle_ms_per_step"] == pytest.approx(0.135)
  assert "no op running" in trace_summary.format_summary(summary)


@pytest.mark.slow
def test_profile_step_traces_the_real_step_on_cpu(tmp_path):
  out = tmp_path / "profile"
  completed = subprocess.run(
      [sys.executable, os.path.join(REPO_ROOT, "benchmarks", "profile_step.py"),
       "--config=configs/pretrain.py:demo", "--batch_size=4", "--steps=1", "--time_steps=1",
       f"--out={out}", "--config.data.num_frames=8", "--config.montage.output_size=32",
       "--config.data.input_size=40"],
      capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
  assert completed.returncode == 0, completed.stderr[-2000:]
  with open(out / "summary.json") as f:
    summary = json.load(f)
  assert summary["unmatched_ms_per_step"] == 0.0
  assert summary["device_ms_per_step"] > 0
  for phase in ("montage", "forward", "backward"):
    assert sum(summary["by_phase_ms"][phase].values()) > 0, phase
  assert summary["by_category_ms"]["convolution"] > 0
  assert (out / "trace.json.gz").exists() and (out / "hlo.txt.gz").exists()
  assert "step, back to back" in completed.stdout


def test_pallas_kernels_are_categorised_by_their_call():
  # A Pallas kernel is a Triton custom call; its op_name carries the pallas_call's name:
  # the fused 1x1 conv (tcvm_jax/conv1x1_kernel.py) is a matmul, the colour jitter not.
  def call(op_name):
    return {"opcode": "custom-call", "target": "__gpu$xla.gpu.triton", "op_name": op_name,
            "triton_gemm": False, "cudnn": False, "calls": None}

  conv = call("jit(train_step)/jvp()/conv1x1_stats/pallas_call")
  jitter = call("jit(train_step)/jit(video_montage)/cond/branch_0_fun/vmap()/pallas_call")
  assert trace_summary.categorize(conv, {}) == "matmul"
  assert trace_summary.categorize(jitter, {}) == "elementwise"
