"""How finely to split a big CPU op into cache-sized chunks (docs/performance.md).

On XLA:CPU some large single ops (the stem's weight gradient, the batched augmentation)
run faster as independent chunks whose working set fits a core's L2 cache. Each chunk is
its own copy of the op in the compiled program, so the count is capped: at the paper's
shapes the cache-sized chunks would number in the hundreds.
"""

MAX_CHUNKS = 8


def chunk_size(num_items: int, item_pixels: int, chunk_pixels: int,
               max_chunks: int = MAX_CHUNKS) -> int:
  """Items per chunk: about `chunk_pixels / item_pixels`, at least 1, and large enough
  that `num_items` items make at most `max_chunks` chunks."""
  size = max(1, round(chunk_pixels / item_pixels))
  return max(size, -(-num_items // max_chunks))


def strided_chunk_count(num_items: int, chunk: int) -> int:
  """How many strided chunks (item c, c + n, c + 2n, ...) split `num_items` items into
  chunks of about `chunk`: the largest divisor of `num_items` that is at most
  ceil(num_items / chunk), so that every chunk has the same number of items."""
  target = max(1, -(-num_items // chunk))
  return max(n for n in range(1, target + 1) if num_items % n == 0)
