#!/usr/bin/env python3
"""Opens WebSockets to a duro object over Cap'n Proto alone (no HTTP gateway), sends texts on
the first and prints what every socket receives.

Uses pycapnp (`pip install pycapnp`, 2.x) and the wire contract, schema/duro.capnp. A
WebSocket over capnp is a `DurableObject.request` with `Upgrade: websocket`: the object's
answer comes back through a `ResponseContext` this client implements, whose `startWebSocket`
hands over the host's `upSocket` (where this side sends) and takes this side's `downSocket`
(where the object's messages arrive). Both are `WebSocket` capabilities.

    duro serve &
    python3 examples/ws_client.py 127.0.0.1:7450 --name lobby hello world

prints, for the built-in `room` class on `/ws` (its default), which sends every text to every
socket, the sender's too:

    0 hello
    0 world
    0 closed 1000 bye

and the same for socket 1, the sockets' lines interleaved. Each line is a socket's number and
what it received: a message (a room's post, `{"seq": n, "text": t, "at": ms}`, by its text), or
the close that answered its own (`closed CODE REASON`). The sockets close once each has
received every text sent.
"""

import argparse
import asyncio
import json
import os
import sys

import capnp

SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "schema", "duro.capnp")

# How long the sockets wait for the texts to come back, and then for the closes.
WAIT_SECONDS = 10


def split_address(address):
    """'HOST:PORT' (or '[IPv6]:PORT') -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"invalid address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def load_schema():
    """The wire contract. Its streaming methods (`-> stream`) are declared in
    `/capnp/stream.capnp`, which pycapnp ships inside its package: the directory above the
    package goes on the import path."""
    standard = os.path.dirname(os.path.dirname(capnp.__file__))
    return capnp.load(SCHEMA, imports=[standard])


duro = load_schema()


class Inbox(duro.WebSocket.Server):
    """This side's `downSocket`: the object's messages, and the close, in the order sent."""

    def __init__(self):
        self.received = asyncio.Queue()

    async def sendText(self, text, _context, **kwargs):
        await self.received.put(("text", text))

    async def sendData(self, data, _context, **kwargs):
        await self.received.put(("data", bytes(data)))

    async def close(self, code, reason, _context, **kwargs):
        await self.received.put(("close", f"{code} {reason}"))


class Answer(duro.ResponseContext.Server):
    """The `ResponseContext` of one request: the object accepts the WebSocket
    (`startWebSocket`), or answers with a plain response (`startResponse`)."""

    def __init__(self):
        self.inbox = Inbox()
        self.started = asyncio.get_running_loop().create_future()

    async def startWebSocket(self, headers, upSocket, _context, **kwargs):
        self.started.set_result(upSocket)
        _context.results.downSocket = self.inbox

    async def startResponse(self, response, bodyFollows, _context, **kwargs):
        self.started.set_exception(
            RuntimeError(f"the object did not accept the WebSocket: it answered {response.status}")
        )


async def open_socket(stub, path):
    """A WebSocket to the object behind `stub`: (upSocket, the inbox of the object's
    messages). The call returns once the host started the socket."""
    answer = Answer()
    request = {"method": "GET", "url": path, "headers": [{"name": "upgrade", "value": "websocket"}]}
    await stub.request(request=request, context=answer, bodyFollows=False)
    return await answer.started, answer.inbox


def text_of(message):
    """The text of a message: a room's post (`{"seq": n, "text": t, "at": ms}`) by its text,
    anything else as it came."""
    try:
        post = json.loads(message)
    except ValueError:
        return message
    if isinstance(post, dict) and isinstance(post.get("text"), str):
        return post["text"]
    return message


async def receive(number, inbox, texts):
    """Prints what socket `number` receives until it has received `texts` in order."""
    waiting = list(texts)
    while waiting:
        kind, value = await inbox.received.get()
        if kind == "text":
            value = text_of(value)
        print(f"{number} {value}", flush=True)
        if kind == "text" and value == waiting[0]:
            waiting.pop(0)


async def close(number, up, inbox):
    """Closes socket `number` and prints the close that answers it."""
    await up.close(code=1000, reason="bye")
    while True:
        kind, value = await inbox.received.get()
        if kind == "close":
            print(f"{number} closed {value}", flush=True)
            return


async def run(address, namespace, name, path, sockets, texts):
    host, port = split_address(address)
    connection = await capnp.AsyncIoStream.create_connection(host=host, port=port)
    client = capnp.TwoPartyClient(connection)
    root = client.bootstrap().cast_as(duro.Host)
    stub = root.namespace(namespace).namespace.getByName(name).stub
    opened = [await open_socket(stub, path) for _ in range(sockets)]
    up, _ = opened[0]
    for text in texts:
        await up.sendText(text=text)
    receiving = [receive(n, inbox, texts) for n, (_, inbox) in enumerate(opened)]
    await asyncio.wait_for(asyncio.gather(*receiving), WAIT_SECONDS)
    closing = [close(n, up, inbox) for n, (up, inbox) in enumerate(opened)]
    await asyncio.wait_for(asyncio.gather(*closing), WAIT_SECONDS)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="HOST:PORT of `duro serve`")
    parser.add_argument("texts", nargs="*", default=["hello"], help="texts to send")
    parser.add_argument("--namespace", default="room", help="the namespace (default: room)")
    parser.add_argument("--name", default="example", help="the object's name")
    parser.add_argument("--path", default="/ws", help="the request's path (default: /ws)")
    parser.add_argument("--sockets", type=int, default=2, help="sockets to open (default: 2)")
    args = parser.parse_intermixed_args()
    try:
        asyncio.run(
            capnp.run(run(args.address, args.namespace, args.name, args.path, args.sockets, args.texts))
        )
    except capnp.KjException as error:
        print(f"ws_client.py: {error.type}: {error.description}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError, asyncio.TimeoutError) as error:
        print(f"ws_client.py: {error!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
