r"""Where the PyTorch reference step's device time goes (for comparison with JAX's).

  python benchmarks/torch_profile.py --config=configs/pretrain.py --batch_size=32 \
      --dtype=bfloat16 [--steps=3] [--compile] [--without_montage] [--json=FILE]

Profiles the reference step of benchmarks/torch_reference.py (montage + augmentation +
model, or the model alone with --without_montage) with
torch.profiler and prints device kernel time per step grouped by a kernel-name heuristic
(`trace_summary.kernel_category`: convolution, matmul, batch norm, copy/transpose, other)
plus the top kernels. Needs torch;
reads the config with ml_collections only (no TensorFlow).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import torch  # pylint: disable=g-import-not-at-top

import benchmarks  # pylint: disable=g-import-not-at-top
from benchmarks import torch_reference  # pylint: disable=g-import-not-at-top
from benchmarks.trace_summary import kernel_category  # pylint: disable=g-import-not-at-top
from tcvm_jax import config_files  # pylint: disable=g-import-not-at-top


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="configs/pretrain.py")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--compile", action="store_true")
  parser.add_argument("--without_montage", action="store_true",
                      help="profile the step on already-augmented pseudo-videos")
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  config = config_files.load_config(args.config)
  config.batch_size = args.batch_size
  spec = torch_reference.ReferenceSpec(**benchmarks.torch_reference_spec(config))
  step = torch_reference.build_train_step(spec, batch_size=args.batch_size, dtype=args.dtype,
                                          compile_model=args.compile)
  run = step.model_run if args.without_montage else step.run
  for _ in range(5):
    run()
  step.synchronize()
  activities = [torch.profiler.ProfilerActivity.CPU]
  if torch.cuda.is_available():
    activities.append(torch.profiler.ProfilerActivity.CUDA)
  with torch.profiler.profile(activities=activities) as profiler:
    for _ in range(args.steps):
      run()
    step.synchronize()
  per_kernel = collections.defaultdict(lambda: [0.0, 0])
  for event in profiler.events():
    device_us = getattr(event, "device_time", 0.0)
    if getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA and device_us:
      per_kernel[event.name][0] += device_us
      per_kernel[event.name][1] += 1
  by_category = collections.defaultdict(float)
  for name, (time_us, _) in per_kernel.items():
    by_category[kernel_category(name)] += time_us / 1e3 / args.steps
  total = sum(by_category.values())
  print(f"torch {'compiled' if args.compile else 'eager'} step, device kernel time per "
        f"step: {total:.2f} ms in {sum(c for _, c in per_kernel.values()) / args.steps:.0f} "
        f"launches")
  for category, ms in sorted(by_category.items(), key=lambda kv: -kv[1]):
    print(f"  {category:<20} {ms:8.2f} ms")
  top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:args.top]
  print("top kernels (ms/step, launches/step, category, name):")
  for name, (time_us, count) in top:
    print(f"  {time_us / 1e3 / args.steps:7.3f} {count / args.steps:5.0f} "
          f"{kernel_category(name)[:11]:<11} {name[:110]}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"total_ms_per_step": total, "by_category_ms": by_category,
                 "top": [[n, t / 1e3 / args.steps, c / args.steps] for n, (t, c) in top]},
                f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
