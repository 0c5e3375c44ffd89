"""Forward a loopback port of this machine to an address inside a network namespace.

The real node lives in a network namespace the dev stack creates (DESIGN §4): its API
server, S3 server and pods have addresses there and nowhere else. kubectl, helm, the tests
and a developer's browser run outside it, on loopback. ``python -m rasterkube_devstack.forward
--netns NAME --listen 127.0.0.1:PORT --target 10.254.0.1:6443`` accepts on the loopback port
and opens each upstream connection from inside the namespace (a socket made by a thread that
joined it, :meth:`.netns.Namespace.socket`), then copies bytes both ways. TLS passes through
untouched, so certificates and tokens work as if the client connected directly.

A plain byte pump (asyncio streams) rather than a tool like socat: it needs no further Debian
package and no process inside the namespace, and its only job is this one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rasterkube_devstack import netns

BUFFER_BYTES = 256 * 1024
CONNECT_TIMEOUT_S = 10.0
#: Written (atomically) once the listener is bound: the port, for callers that asked for port 0.
PORT_FILE_SUFFIX = ".port"


def parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host, int(port)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(BUFFER_BYTES):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: the other direction may still be talking
    except (ConnectionError, OSError):
        pass


class Forwarder:
    """Accepts on ``listen`` (this process's namespace), connects to ``target`` inside ``ns``."""

    def __init__(self, ns: netns.Namespace, target: tuple[str, int]) -> None:
        self.ns = ns
        self.target = target
        # One thread that joined the namespace makes every upstream socket.
        self._maker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netns-sockets",
                                         initializer=self._join_namespace)  # fmt: skip

    def _join_namespace(self) -> None:
        fd = os.open(self.ns.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            netns._libc_setns(fd, netns.CLONE_NEWNET)
        finally:
            os.close(fd)

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(self._maker, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, self.target), CONNECT_TIMEOUT_S)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock, limit=BUFFER_BYTES)

    async def handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await self._upstream()
        except (OSError, asyncio.TimeoutError):
            client_writer.close()
            return
        try:
            await asyncio.gather(_pump(client_reader, up_writer), _pump(up_reader, client_writer))
        finally:
            for writer in (up_writer, client_writer):
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()


async def serve(ns: netns.Namespace, listen: tuple[str, int], target: tuple[str, int],
                port_file: Path | None) -> None:  # fmt: skip
    forwarder = Forwarder(ns, target)
    server = await asyncio.start_server(forwarder.handle, listen[0], listen[1], limit=BUFFER_BYTES)
    port = server.sockets[0].getsockname()[1]
    if port_file is not None:
        tmp = port_file.with_name(port_file.name + ".tmp")
        tmp.write_text(f"{port}\n")
        os.replace(tmp, port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--netns", required=True, help="name of the network namespace (/run/netns/NAME)")
    parser.add_argument("--listen", type=parse_address, required=True, help="HOST:PORT here (port 0: any)")
    parser.add_argument("--target", type=parse_address, required=True, help="HOST:PORT inside the namespace")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    args = parser.parse_args(argv)
    ns = netns.Namespace(args.netns)
    if not ns.exists():
        print(f"network namespace {args.netns!r} does not exist", file=sys.stderr)
        return 2
    asyncio.run(serve(ns, args.listen, args.target, args.port_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
