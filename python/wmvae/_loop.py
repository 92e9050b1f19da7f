"""A private asyncio event loop on a background thread.

Role: lets synchronous callers (a gymnasium ``step``, a notebook cell that
already runs its own loop, a plain script) use the package's async NATS
code: coroutines are submitted to this loop and their results waited for
from the calling thread.

It does not own any connection: whoever submits the coroutines opens and
closes them on this loop. ``shared()`` is one loop per process for the
module-level sync functions (``load_vae``, ``decode``); a wrapper that
holds connections for its whole life makes its own.
"""
import asyncio
import threading

_shared = None
_shared_lock = threading.Lock()


class BackgroundLoop:
    """An event loop running forever on a daemon thread."""

    def __init__(self, name="wmvae-loop"):
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(started.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()
        started.wait()

    def submit(self, coro):
        """Schedules `coro` on the loop; returns a concurrent.futures.Future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro, timeout=None):
        """Runs `coro` on the loop and waits for its result (its exception
        is raised here). On timeout the coroutine is cancelled."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("BackgroundLoop.run called from its own loop thread (it would deadlock)")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def close(self):
        """Cancels what still runs, stops the loop and joins its thread."""
        if self.loop.is_closed():
            return

        async def cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.thread.is_alive():
            try:
                self.run(cancel_all(), timeout=10)
            except Exception:
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


def shared():
    """The process-wide background loop (started on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.thread.is_alive():
            _shared = BackgroundLoop("wmvae-shared-loop")
        return _shared
