"""Publishing frames to the daemon, through stream leader elections.

Role: ``Publisher`` (asyncio) and ``SyncPublisher`` (blocking, for plain
scripts, notebooks and gymnasium wrappers) send frame messages to
``<prefix>.frames.<source>`` with a JetStream publish, each with its
``Nats-Msg-Id`` (``wmvae.messages.msg_id``). A publish whose stored-ack
does not come (a timeout, no responders while a cluster elects a stream
leader, a server restarting) is sent again with the same id after 0.25,
0.5, 1, 2, 4 and 8 s (~16 s in all, longer than an election): JetStream
stores a retry of a frame that did land once (2-minute duplicate window).
``publish(..., wait=False)`` keeps up to ``max_pending`` publishes in
flight (a bounded window of outstanding acks); ``flush()`` waits for them
and raises the first failure.

It does not preprocess frames (the daemon crops and resizes on ingest),
retry errors that a retry cannot fix (a refused permission, a payload too
large, a bad frame: ``ValueError`` before anything is sent), or persist
frames it could not send.
"""
import asyncio
import logging

import nats.errors
import nats.js.errors

from . import _loop, messages
from . import connection as _connection

log = logging.getLogger(__name__)

#: Pauses between tries of one publish, in seconds: ~16 s covers an election.
RETRY_PAUSES = (0.25, 0.5, 1, 2, 4, 8)

#: What a retry can fix: no ack in time, no stream leader, a connection
#: being re-established.
RETRYABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,  # nats-py's name for no responders on a JetStream publish
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.ServiceUnavailableError,
    asyncio.TimeoutError,
)


class Publisher:
    """Publishes one source's frames (asyncio).

        async with Publisher("worker-1") as pub:
            await pub.publish("ep-1", 0, obs, action=[0.0, 1.0, 0.0], reward=0.1, done=False)

    `nats_url` (comma-separated servers) overrides WMVAE_NATS__URL;
    credentials come from WMVAE_NATS__* (``wmvae.connection``). Pass
    `connection` to publish on a nats-py client you already hold (it is
    then not closed here).
    """

    def __init__(self, source, nats_url=None, *, connection=None, prefix=None, max_pending=256,
                 retry_pauses=RETRY_PAUSES, ack_timeout=5.0):
        self.source = messages.check_source(source)
        self.nats_url = nats_url
        self.prefix = prefix or _connection.subject_prefix()
        self.subject = f"{self.prefix}.frames.{self.source}"
        self.max_pending = max(1, int(max_pending))
        self.retry_pauses = tuple(retry_pauses)
        self.ack_timeout = ack_timeout
        self.retries = 0
        self._nc = connection
        self._owns_connection = connection is None
        self._js = None
        self._window = None
        self._in_flight = set()
        self._failure = None

    async def connect(self):
        """Opens the connection (done by ``async with`` and the first publish)."""
        if self._js is None:
            if self._nc is None:
                self._nc = await _connection.connect(self.nats_url, reconnect=True)
            self._js = self._nc.jetstream(timeout=self.ack_timeout)
            self._window = asyncio.Semaphore(self.max_pending)
        return self

    async def __aenter__(self):
        return await self.connect()

    async def __aexit__(self, kind, value, traceback):
        await self.close(flush=kind is None)

    def msg_id(self, episode, step):
        """The Nats-Msg-Id of this source's frame (episode, step)."""
        return messages.msg_id(self.source, episode, step)

    async def publish(self, episode, step, pixels, action=None, reward=None, done=None, *, wait=True):
        """Publishes one frame (uint8 (H, W, 3)). With ``wait=True`` returns
        JetStream's ack once stored; with ``wait=False`` returns as soon as
        the frame is in flight (at most ``max_pending`` at once: it waits for
        room), and a failure is raised by a later ``publish`` or ``flush``."""
        message = messages.frame_message(episode, step, pixels, action, reward, done)
        payload = messages.pack(message)
        msg_id = self.msg_id(episode, message["step"])
        return await self.publish_payload(payload, msg_id, wait=wait)

    async def publish_payload(self, payload, msg_id, *, wait=True):
        """Publishes an already packed frame message with its id (as ``publish``)."""
        await self.connect()
        self._raise_failure()
        if wait:
            return await self._send(payload, msg_id)
        await self._window.acquire()
        task = asyncio.get_running_loop().create_task(self._send(payload, msg_id))
        self._in_flight.add(task)
        task.add_done_callback(self._finished)
        return None

    def _finished(self, task):
        self._in_flight.discard(task)
        self._window.release()
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()

    def _raise_failure(self):
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    async def _send(self, payload, msg_id):
        for pause in self.retry_pauses + (None,):
            try:
                return await self._js.publish(self.subject, payload, timeout=self.ack_timeout,
                                              headers={"Nats-Msg-Id": msg_id})
            except RETRYABLE as error:
                if pause is None:
                    raise
                self.retries += 1
                log.warning("publish %s failed (%r); again in %s s", msg_id, error, pause)
                await asyncio.sleep(pause)

    @property
    def pending(self):
        """Publishes in flight (sent with ``wait=False``, not acked yet)."""
        return len(self._in_flight)

    async def flush(self):
        """Waits for every publish in flight; raises the first failure."""
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight), return_exceptions=True)
        self._raise_failure()

    async def close(self, flush=True):
        """Flushes (unless ``flush=False``, which cancels what is in flight)
        and closes the connection this publisher opened."""
        try:
            if flush:
                await self.flush()
            else:
                for task in list(self._in_flight):
                    task.cancel()
                await asyncio.gather(*list(self._in_flight), return_exceptions=True)
        finally:
            if self._owns_connection and self._nc is not None and not self._nc.is_closed:
                await self._nc.close()
            self._js = None


class SyncPublisher:
    """``Publisher`` for synchronous code: its own event loop on a
    background thread, so it works in scripts, notebooks and environment
    wrappers alike.

        pub = SyncPublisher("worker-1")
        pub.publish("ep-1", 0, obs, action=[0, 1, 0], reward=0.0, done=False)
        pub.close()
    """

    def __init__(self, source, nats_url=None, **options):
        self._loop = _loop.BackgroundLoop("wmvae-publisher")
        try:
            self._publisher = Publisher(source, nats_url, **options)
            self._loop.run(self._publisher.connect())
        except BaseException:
            self._loop.close()
            raise
        self.source = self._publisher.source

    def publish(self, episode, step, pixels, action=None, reward=None, done=None, *, wait=True, timeout=None):
        """As ``Publisher.publish``: blocks until the ack (``wait=True``) or
        until the frame is in flight (``wait=False``)."""
        return self._loop.run(self._publisher.publish(episode, step, pixels, action, reward, done, wait=wait), timeout)

    @property
    def pending(self):
        return self._publisher.pending

    @property
    def retries(self):
        return self._publisher.retries

    def flush(self, timeout=None):
        self._loop.run(self._publisher.flush(), timeout)

    def close(self, flush=True, timeout=60):
        try:
            self._loop.run(self._publisher.close(flush=flush), timeout)
        finally:
            self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        self.close(flush=kind is None)
