"""tcvm_jax/cpu_chunks.py: cache-sized chunks, capped in number."""

import math

import pytest

from tcvm_jax import cpu_chunks


@pytest.mark.parametrize("num_items, item_pixels, chunk_pixels, expected", [
    (256, 56 * 56, 100_000, 32),        # the demo's stem: 8 chunks of 32 frames
    (64, 4 * 64 * 64, 262_144, 16),     # the demo's augmentation: 4 chunks of 16 clips
    (6, 2 * 16 * 16, 2048, 4),          # 4 + 2
    (3, 10, 1_000_000, 1_000_000 // 10),  # one chunk holds everything
    (5, 1_000_000, 10, 1),              # never below one item
    (1024, 112 * 112, 100_000, 128),    # the paper's stem on CPU: capped at 8 chunks
    (128, 8 * 128 * 128, 262_144, 16),  # the paper's augmentation: capped at 8 chunks
])
def test_chunk_size(num_items, item_pixels, chunk_pixels, expected):
  size = cpu_chunks.chunk_size(num_items, item_pixels, chunk_pixels)
  assert size == expected
  assert math.ceil(num_items / size) <= cpu_chunks.MAX_CHUNKS


@pytest.mark.parametrize("num_items, chunk, expected", [
    (256, 32, 8),  # the demo's stem: 8 strided chunks of 32 frames
    (512, 64, 8),
    (6, 2, 3),
    (8, 3, 2),     # 3 chunks of ~3 cannot be equal: 2 of 4
    (5, 2, 1),     # 5 frames split equally only into 5 or 1
    (3, 7, 1),     # one chunk holds everything
    (7, 1, 7),
])
def test_strided_chunk_count(num_items, chunk, expected):
  count = cpu_chunks.strided_chunk_count(num_items, chunk)
  assert count == expected
  assert num_items % count == 0 and count <= max(1, math.ceil(num_items / chunk))
