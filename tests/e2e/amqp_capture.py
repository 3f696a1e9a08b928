"""A TLS-terminating proxy in front of the hub's AMQP port that records what a client sends:
the official SDKs' own frames, as fuzz seeds (`fuzz/corpus/amqp_*`) and as regression input.
It presents the hub's own certificate (from the hub's data directory), so the SDKs connect
to it unchanged, and forwards both ways. SAS signatures in the recording are blanked to the
same length, so the frames stay well formed and no working credential is kept."""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
from pathlib import Path


def redact(stream: bytes) -> bytes:
    """Every `sig=…` value (URL-encoded base64) replaced by as many `A`s."""
    return re.sub(rb"sig=([A-Za-z0-9%+/=_-]+)", lambda m: b"sig=" + b"A" * len(m.group(1)), stream)


def whole_frames(stream: bytes) -> bytes:
    """The stream up to its last whole AMQP frame: protocol headers and frames are walked,
    and whatever follows a frame header that cannot be one (the bytes some clients write after
    their TLS close) is cut off."""
    i = 0
    while i < len(stream):
        if stream[i:i + 4] == b"AMQP":
            i += 8
            continue
        if i + 8 > len(stream):
            break
        size, doff, kind = int.from_bytes(stream[i:i + 4], "big"), stream[i + 4], stream[i + 5]
        if size < 8 or doff < 2 or kind not in (0, 1) or i + size > len(stream):
            break
        i += size
    return stream[:i]


class CapturingProxy:
    """One asyncio loop on a thread of its own serves every proxied connection (an SSL object
    is never touched from two threads)."""

    def __init__(self, hub):
        certs = Path(hub.ca_path).parent
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.server_ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
        self.client_ctx = ssl.create_default_context(cafile=hub.ca_path)
        self.hostname = hub.hostname
        self.upstream = ("127.0.0.1", hub.ports["amqp"])
        self.streams: list[bytearray] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def start():
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.server_ctx)
            self.port = self.server.sockets[0].getsockname()[1]
            ready.set()

        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(start(), self.loop)
        assert ready.wait(10), "the proxy did not start"

    async def _serve(self, down_r, down_w) -> None:
        recorded = bytearray()
        self.streams.append(recorded)
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream, ssl=self.client_ctx,
                                                       server_hostname=self.hostname)
        except (OSError, ssl.SSLError):
            down_w.close()
            return

        async def pump(r, w, record):
            try:
                while chunk := await r.read(65536):
                    if record is not None and len(record) < 1 << 20:
                        record.extend(chunk)
                    w.write(chunk)
                    await w.drain()
            except (OSError, ssl.SSLError, ConnectionError):
                pass
            finally:
                w.close()

        await asyncio.gather(pump(down_r, up_w, recorded), pump(up_r, down_w, None))

    def recorded(self) -> list[bytes]:
        async def snapshot():
            return [whole_frames(redact(bytes(s))) for s in self.streams if s]

        return asyncio.run_coroutine_threadsafe(snapshot(), self.loop).result(10)

    def close(self) -> None:
        async def stop():
            self.server.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
