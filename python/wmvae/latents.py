"""Reading the daemon's latents from the WM_LATENTS stream.

Role: ``latents()``, an async iterator over every latent message (one per
valid frame: PROTOCOL.md, "Latents out") decoded to a dict with NumPy
``mu`` and ``logvar``, in stream order: replayed from the start (or a
sequence, a time, only new ones) and then live, or only what the stream
holds now (``follow=False``). Without ``durable`` it reads through an
ordered ephemeral consumer (nothing to clean up, nothing acked); with
``durable="name"`` through a durable pull consumer of that name, each
latent acked once the loop asks for the next, so a reader that restarts
goes on where it stopped (at least once: the latent it was handling when
it stopped comes again).

It does not group latents into episodes or write files
(``wmvae.series``), nor re-encode frames (``wmvae.model``).
"""
import datetime

import nats.errors
from nats.js import api

from . import connection as _connection
from . import messages

STREAM = "WM_LATENTS"


def _consumer_config(start):
    """ConsumerConfig for `start`: "all", "new", "last", a stream sequence
    (int) or a datetime."""
    config = api.ConsumerConfig()
    if start == "all" or start is None:
        config.deliver_policy = api.DeliverPolicy.ALL
    elif start == "new":
        config.deliver_policy = api.DeliverPolicy.NEW
    elif start == "last":
        config.deliver_policy = api.DeliverPolicy.LAST
    elif isinstance(start, int) and not isinstance(start, bool) and start >= 1:
        config.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = start
    elif isinstance(start, datetime.datetime):
        config.deliver_policy = api.DeliverPolicy.BY_START_TIME
        config.opt_start_time = start
    else:
        raise ValueError(f"start must be 'all', 'new', 'last', a sequence >= 1 or a datetime, not {start!r}")
    return config


async def latents(source=">", nats_url=None, *, connection=None, durable=None, start="all", follow=True,
                  version=None, prefix=None, fetch_batch=256):
    """Yields latents of `source` (">" for every source) as dicts:
    ``source``, ``episode``, ``step``, ``model_version``, ``mu`` and
    ``logvar`` (float32 (32,)), ``action`` (float32 array or None),
    ``reward``, ``done``, and ``seq`` (the stream sequence).

        async for latent in wmvae.latents("worker-1"):
            print(latent["episode"], latent["step"], latent["mu"][:4])

    `start`: "all" (default), "new", "last", a stream sequence or a
    datetime. ``follow=False`` stops after the last latent the stream held
    when the iteration began. `version` keeps only latents that model
    version encoded. `nats_url`/WMVAE_NATS__* as ``wmvae.connection``; or
    pass an open nats-py `connection` (not closed here).
    """
    prefix = prefix or _connection.subject_prefix()
    if source != ">":
        messages.check_source(source)
    subject = f"{prefix}.latents.{source}"
    nc = connection
    owns = nc is None
    if owns:
        nc = await _connection.connect(nats_url, reconnect=True)
    js = nc.jetstream()

    def keep(latent):
        return version is None or latent["model_version"] == version

    last = None

    def at_end(msg):
        return not follow and (msg.metadata.num_pending == 0 or msg.metadata.sequence.stream >= last)

    try:
        if not follow:  # up to the last latent the stream held when we began
            last = (await js.stream_info(STREAM)).state.last_seq
        if durable is None:
            sub = await js.subscribe(subject, stream=STREAM, ordered_consumer=True,
                                     config=_consumer_config(start))
            try:
                if not follow:
                    info = await sub.consumer_info()
                    if last == 0 or (info.num_pending == 0 and not info.delivered.stream_seq):
                        return  # nothing to replay (pending counts only what is not delivered yet)
                async for msg in sub.messages:
                    latent = messages.decode_latent(msg.data, msg.subject, prefix)
                    latent["seq"] = msg.metadata.sequence.stream
                    if keep(latent):
                        yield latent
                    if at_end(msg):
                        return
            finally:
                await _quietly(sub.unsubscribe())
        else:
            sub = await js.pull_subscribe(subject, durable=durable, stream=STREAM, config=_consumer_config(start))
            try:
                while True:
                    try:
                        batch = await sub.fetch(fetch_batch, timeout=2 if not follow else 5)
                    except nats.errors.TimeoutError:
                        if not follow:
                            return
                        continue
                    for msg in batch:
                        latent = messages.decode_latent(msg.data, msg.subject, prefix)
                        latent["seq"] = msg.metadata.sequence.stream
                        if keep(latent):
                            yield latent
                        await msg.ack()
                        if at_end(msg):
                            return
            finally:
                await _quietly(sub.unsubscribe())
    finally:
        if owns and not nc.is_closed:
            await nc.close()


async def _quietly(awaitable):
    try:
        await awaitable
    except Exception:
        pass
