"""The background input prefetcher: order, depth bound, errors, stopping, blocking sources."""

from __future__ import annotations

import itertools
import threading
import time
import traceback

import numpy as np
import pytest

from tcvm_jax import mesh as mesh_lib
from tcvm_jax import prefetch, train
from train_test_utils import tiny_config


def _wait_until(condition, timeout: float = 5.0) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition():
      return True
    time.sleep(0.005)
  return condition()


def test_items_arrive_in_source_order_transformed():
  for depth in (1, 2, 5):
    with prefetch.Prefetcher(range(40), lambda x: x * x, depth=depth) as items:
      assert list(items) == [x * x for x in range(40)]
      with pytest.raises(StopIteration):
        next(items)
      assert _wait_until(lambda: not items.thread.is_alive())


def test_the_source_runs_at_most_depth_plus_one_items_ahead():
  produced = []

  def source():
    for index in itertools.count():
      produced.append(index)
      yield index

  depth = 3
  with prefetch.Prefetcher(source(), depth=depth) as items:
    # depth items wait in the queue, one more waits in the worker for room; no further.
    assert _wait_until(lambda: len(produced) == depth + 1)
    time.sleep(0.2)
    assert len(produced) == depth + 1
    for consumed in range(1, 6):
      assert next(items) == consumed - 1
      assert _wait_until(lambda: len(produced) == consumed + depth + 1)
      time.sleep(0.05)
      assert len(produced) == consumed + depth + 1


def test_a_source_error_reaches_the_consumer_in_place_with_its_traceback():
  def failing_source():
    yield from range(3)
    raise ValueError("record 3 is corrupt")

  items = prefetch.Prefetcher(failing_source(), depth=2)
  assert [next(items) for _ in range(3)] == [0, 1, 2]  # what came before, in order
  with pytest.raises(ValueError, match="record 3 is corrupt") as raised:
    next(items)
  frames = [frame.name for frame in traceback.extract_tb(raised.value.__traceback__)]
  assert "failing_source" in frames  # the worker's frames, not only the consumer's
  with pytest.raises(StopIteration):  # finished after the error
    next(items)
  assert _wait_until(lambda: not items.thread.is_alive())
  assert items.close()


def test_a_transform_error_keeps_its_type():
  def transform(batch):
    return batch["video"]  # KeyError on the second item

  items = prefetch.Prefetcher(iter([{"video": 1}, {"label": 2}]), transform)
  assert next(items) == 1
  with pytest.raises(KeyError, match="video"):
    next(items)
  # A StopIteration from the transform must not end the consumer's loop silently.
  items = prefetch.Prefetcher(range(3), lambda x: next(iter([])))
  with pytest.raises(RuntimeError, match="StopIteration"):
    next(items)


def test_stopping_early_ends_the_thread_and_closes_the_source():
  cleaned_up = threading.Event()

  def endless():
    try:
      yield from itertools.count()
    finally:
      cleaned_up.set()

  produced = []
  items = prefetch.Prefetcher(endless(), lambda x: produced.append(x) or x, depth=2)
  assert [next(items) for _ in range(3)] == [0, 1, 2]
  assert _wait_until(lambda: len(produced) == 6)  # the worker waits for room in the queue
  started = time.monotonic()
  assert items.close(timeout=5.0)
  assert time.monotonic() - started < 2.0  # woken at once, not by the timeout
  assert not items.thread.is_alive()
  assert cleaned_up.is_set()  # the generator's `finally` ran
  with pytest.raises(StopIteration):
    next(items)

  # The same when the consumer's loop raises inside a `with` block (an error, preemption).
  with pytest.raises(KeyboardInterrupt):
    with prefetch.Prefetcher(itertools.count(), depth=1) as items:
      next(items)
      raise KeyboardInterrupt
  assert not items.thread.is_alive()


def test_a_blocking_source_delivers_when_ready_and_does_not_hang_close():
  release = threading.Event()

  def blocking_source():
    yield "first"
    release.wait()  # e.g. a file system or a decoder that is slow to answer
    yield "second"
    release.wait()
    yield "never consumed"

  items = prefetch.Prefetcher(blocking_source(), depth=2)
  assert next(items) == "first"
  threading.Timer(0.2, release.set).start()
  started = time.monotonic()
  assert next(items) == "second"  # waits for the source, then gets the item
  assert time.monotonic() - started >= 0.15

  release.clear()
  stuck = prefetch.Prefetcher(blocking_source(), depth=2)
  assert next(stuck) == "first"
  started = time.monotonic()
  assert not stuck.close(timeout=0.2)  # still inside the source: close gives up, in time
  assert time.monotonic() - started < 2.0
  assert stuck.thread.daemon  # cannot keep the process alive
  release.set()
  stuck.thread.join(5.0)
  assert not stuck.thread.is_alive()  # and it ends once the source returns
  with pytest.raises(StopIteration):
    next(stuck)
  assert items.close()


def test_the_source_runs_while_the_consumer_works():
  # 8 items that take 0.1 s to make and 0.1 s to use: ~1.6 s in series, ~0.9 s overlapped.
  def slow_source():
    for index in range(8):
      time.sleep(0.1)
      yield index

  started = time.monotonic()
  with prefetch.Prefetcher(slow_source(), depth=2) as items:
    for _ in items:
      time.sleep(0.1)
  assert time.monotonic() - started < 1.3


def test_depth_must_be_positive():
  for depth in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="depth"):
      prefetch.Prefetcher(range(3), depth=depth)


def test_training_input_through_the_prefetcher_is_the_direct_input():
  # An odd video size (3 x 5 x 5 x 3 = 225 bytes, not whole 64-bit words).
  config = tiny_config(batch_size=4, **{"data.num_frames": 3, "data.input_size": 5})
  mesh = mesh_lib.create_mesh()
  direct = train.random_video_batches(config, process_index=0, batch_size_per_process=4,
                                      start_batch=2)
  source = itertools.islice(
      train.random_video_batches(config, process_index=0, batch_size_per_process=4,
                                 start_batch=2), 5)
  with prefetch.Prefetcher(
      source, lambda batch: mesh_lib.host_batch_to_global(batch["video"], mesh)) as items:
    prefetched = [np.asarray(videos) for videos in items]
  assert len(prefetched) == 5
  for videos in prefetched:
    expected = next(direct)["video"]
    assert videos.shape == (4, 3, 5, 5, 3) and videos.dtype == np.uint8
    np.testing.assert_array_equal(videos, expected)
  # Noise, not a constant: every byte value shows up in 5 x 900 bytes.
  assert len(np.unique(np.concatenate(prefetched))) == 256
  # Process invariance on the partial-word path too: two halves make the whole batch.
  halves = [next(train.random_video_batches(config, process_index=p, batch_size_per_process=2,
                                            start_batch=2))["video"] for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves), prefetched[0])
