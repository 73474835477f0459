"""Blocking work off the trio loop: metadata calls and chunk I/O in bounded worker threads,
and background loops that log what goes wrong and keep the mount serving."""

import logging
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from dfsfs.core.settings import CoreSettings
from dfsfs.errors import DfsfsError, MetadataUnavailableError

log = logging.getLogger(__name__)


class Offload:
    def __init__(self, settings: CoreSettings):
        self.timeout_s = settings.metadata_timeout_s
        self.meta_limiter = trio.CapacityLimiter(settings.metadata_threads)
        self.chunk_limiter = trio.CapacityLimiter(settings.chunk_threads)
        self.metadata_reachable = True  # the last metadata call got an answer

    async def meta(self, function, *args, **kwargs):
        """A metadata call in a worker thread; EIO if the database does not answer in
        time. A frozen server must not hang every process using the mount, so the thread
        is abandoned then: each call is one transaction, which lands whole or not at all,
        and the caller reports the outcome as unknown (EIO), as a network file system does."""
        with trio.move_on_after(self.timeout_s):
            try:
                result = await trio.to_thread.run_sync(
                    partial(function, *args, **kwargs), limiter=self.meta_limiter,
                    abandon_on_cancel=True)
            except MetadataUnavailableError:
                self.metadata_reachable = False
                raise
            self.metadata_reachable = True
            return result
        self.metadata_reachable = False
        raise MetadataUnavailableError(
            f"the metadata database did not answer within {self.timeout_s:g} s")

    async def chunks(self, function, *args):
        """Chunk I/O (and hashing) in a worker thread."""
        return await trio.to_thread.run_sync(partial(function, *args), limiter=self.chunk_limiter)


MAX_RETRY_S = 30.0


async def supervised(name: str, step: Callable[[], Awaitable[None]], retry_s: float = 1.0) -> None:
    """Run a background loop's `step` forever; an exception is logged and the loop goes
    on after `retry_s`, doubling while it keeps failing: no background task may end the
    mount. An expected failure (the database or a store away) is a warning; anything
    else is a bug, logged with its traceback."""
    delay = retry_s
    while True:
        try:
            await step()
            delay = retry_s
            continue
        except trio.Cancelled:
            raise
        except DfsfsError as error:
            log.warning("background task %s failed: %s; retrying in %g s", name, error, delay)
        except Exception:  # noqa: BLE001 - logged with its traceback, then retried
            log.exception("background task %s failed; retrying in %g s", name, delay)
        await trio.sleep(delay)
        delay = min(delay * 2, MAX_RETRY_S)
