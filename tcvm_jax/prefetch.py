"""A background prefetcher: the next input batches are made while the device trains.

`Prefetcher(source, transform, depth=2)` iterates `source` in a daemon thread, applies
`transform` to each item (e.g. `mesh.host_batch_to_global`, the host -> device copy) and
keeps up to `depth` finished items in a queue. The consumer iterates the prefetcher like
the source: same items, same order. An exception raised by the source or the transform
reaches the consumer at the position where it happened, with its original traceback.
`close()` (or leaving a `with` block) stops the worker and waits for it.

NumPy and JAX release the GIL in their heavy parts (random bits, copies, transfers), so
the worker runs in parallel with the training loop's Python dispatch.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator, TypeVar

from absl import logging

SourceItem = TypeVar("SourceItem")
Item = TypeVar("Item")

_END = object()  # the source is exhausted


class _Failure:
  """The worker's exception, handed to the consumer in place of an item."""

  def __init__(self, error: BaseException):
    self.error = error


class Prefetcher(Iterator[Item]):
  """Iterates `transform(x) for x in source` ahead of the consumer, in a daemon thread.

  At most `depth` transformed items wait in the queue, plus one the worker has made and
  is waiting to hand over: the source is never more than `depth + 1` items ahead of what
  the consumer took.
  """

  def __init__(self, source: Iterable[SourceItem],
               transform: Callable[[SourceItem], Item] | None = None, *, depth: int = 2,
               name: str = "prefetch"):
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
      raise ValueError(f"depth={depth!r}: the prefetch depth must be an integer >= 1.")
    self._source = source
    self._transform = transform
    self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._finished = False  # the consumer saw the end or an error
    self._thread = threading.Thread(target=self._work, name=name, daemon=True)
    self._thread.start()

  # --- The worker thread ----------------------------------------------------------

  def _work(self) -> None:
    iterator = None
    try:
      iterator = iter(self._source)
      while not self._stop.is_set():
        try:
          item = next(iterator)
        except StopIteration:
          self._queue.put(_END)
          return
        if self._transform is not None:
          try:
            item = self._transform(item)
          except StopIteration as error:  # would otherwise end the consumer's loop silently
            raise RuntimeError("The prefetch transform raised StopIteration.") from error
        self._queue.put(item)  # blocks while `depth` items wait; close() makes room
    except BaseException as error:  # pylint: disable=broad-except (re-raised by the consumer)
      self._queue.put(_Failure(error))
    finally:
      # Stopped early: let a generator source run its own clean-up (its `finally`s).
      close_source = getattr(iterator, "close", None)
      if self._stop.is_set() and close_source is not None:
        try:
          close_source()
        except Exception:  # pylint: disable=broad-except
          logging.exception("Closing the prefetch source failed.")

  # --- The consumer ---------------------------------------------------------------

  def __iter__(self) -> Prefetcher[Item]:
    return self

  def __next__(self) -> Item:
    if self._finished or self._stop.is_set():
      raise StopIteration
    while True:
      try:
        message = self._queue.get(timeout=1.0)
        break
      except queue.Empty:
        # Only a dead worker that left nothing behind can get us here for good.
        if not self._thread.is_alive() and self._queue.empty():
          self._finished = True
          raise RuntimeError("The prefetch worker ended without delivering an item.") from None
    if message is _END:
      self._finished = True
      raise StopIteration
    if isinstance(message, _Failure):
      self._finished = True
      raise message.error  # the worker's traceback stays attached to it
    return message

  def close(self, timeout: float | None = 10.0) -> bool:
    """Stops the worker and waits up to `timeout` seconds; True if it has ended.

    A worker inside a blocking source call ends when that call returns; it is a daemon
    thread, so it never keeps the process alive.
    """
    self._stop.set()
    self._drain()  # unblocks a worker waiting for room; it sees the stop flag next
    self._thread.join(timeout)
    self._drain()  # what the worker put in between
    ended = not self._thread.is_alive()
    if not ended:
      logging.warning("The input prefetch thread %r is still busy in its source after %ss; "
                      "leaving it (a daemon thread) to finish on its own.",
                      self._thread.name, timeout)
    return ended

  def _drain(self) -> None:
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        return

  @property
  def thread(self) -> threading.Thread:
    """The worker thread (for tests and diagnostics)."""
    return self._thread

  def __enter__(self) -> Prefetcher[Item]:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
