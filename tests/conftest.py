"""Set-up shared by the test modules, run by pytest before it collects them."""

import importlib.util

# With PyTorch installed (tests/test_torch_reference.py): importing triton, torch.compile's
# compiler, after TensorFlow segfaults the process (tensorflow-cpu 2.21 with triton 3.8);
# the other order works. Test modules import TensorFlow (the input pipeline) before the
# torch tests run, so triton goes first. Without torch (CI) this does nothing.
if importlib.util.find_spec("triton") is not None:
  import triton  # pylint: disable=unused-import
