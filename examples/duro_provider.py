"""Serving an external class of a duro host from Python: connect, authenticate, register a
class, and stay connected, reconnecting when the connection is lost.

A provider implements `ClassProvider` (schema/duro.capnp): for each object the host activates
on it, `newInstance(context)` builds the object's instance, an `ExternalObject` (its `fetch`,
and `alarm` if the class sets alarms). The `context` gives the object's ID (`context.id()`),
its storage (`context.storage().storage`: get/put/delete, list, transactions, alarms, on raw
bytes) and its env (`context.env().host`: the host's namespaces, to call other objects).

WebSockets: while handling a request with `Upgrade: websocket` (`is_upgrade(request)`), an
instance accepts it with `context.acceptWebSocket(tags=[...])` and answers with status 101.
The host holds the socket from then on, also while the object is evicted, and calls the
instance's `webSocketMessage(socket, message)`, `webSocketClose(socket, code, reason)` and
`webSocketError(socket, error)`; `socket.sendText(text=...)` sends (once the writes made
before are durable), `context.getWebSockets()` lists the object's sockets.

Streamed bodies: an instance that implements `request` (the streaming form of `fetch`) is
served with `uses_request=True`, and then gets every request there (see `ExternalObject` in
schema/duro.capnp); by default every request reaches `fetch` with its whole body.

The host keeps the guarantees of any Durable Object: one instance per object however many
providers are connected, its events in order and one at a time (the next one arrives once the
instance answered, or while it awaits a call on another object), and every answer held until
the writes made before it are durable. So a handler may read, compute and write without
locks. examples/provider_counter.py and examples/provider_room.py use this module.

Uses pycapnp (`pip install pycapnp`, 2.x), which loads schema/duro.capnp at run time.
"""

import argparse
import asyncio
import os
import sys

import capnp

SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "schema", "duro.capnp")

# How often the provider calls the host to learn that the connection was lost, which also
# keeps the connection from the host's idle timeout.
PING_SECONDS = 1.0
# The longest wait between two attempts to connect again.
RECONNECT_SECONDS_MAX = 2.0


def load_schema():
    """The wire contract. Its streaming methods (`-> stream`) are declared in
    `/capnp/stream.capnp`, which pycapnp ships inside its package: the directory above the
    package goes on the import path."""
    standard = os.path.dirname(os.path.dirname(capnp.__file__))
    return capnp.load(SCHEMA, imports=[standard])


duro = load_schema()


def is_upgrade(request):
    """Whether the `HttpRequest` asks for a WebSocket (`Upgrade: websocket`)."""
    return any(
        header.name.lower() == "upgrade" and "websocket" in header.value.lower()
        for header in request.headers
    )


def split_address(address):
    """'HOST:PORT' (or '[IPv6]:PORT') -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"invalid address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def response(status, body, content_type="text/plain; charset=utf-8"):
    """An `HttpResponse` as pycapnp takes it: a dict."""
    if isinstance(body, str):
        body = body.encode()
    headers = [{"name": "content-type", "value": content_type}]
    return {"status": status, "headers": headers, "body": body}


class Provider(duro.ClassProvider.Server):
    """Builds an instance per object with `make_instance(context)`."""

    def __init__(self, make_instance):
        self.make_instance = make_instance

    async def newInstance(self, context, _context, **kwargs):
        _context.results.instance = self.make_instance(context)


class Fatal(Exception):
    """A refusal that connecting again would not change (a wrong token, an unknown class)."""


async def serve_once(address, class_name, make_instance, token, uses_request=False):
    """Connects, registers, and serves until the connection is lost (raising then)."""
    host, port = split_address(address)
    connection = await capnp.AsyncIoStream.create_connection(host=host, port=port)
    client = capnp.TwoPartyClient(connection)
    root = client.bootstrap().cast_as(duro.Host)
    try:
        if token is not None:
            root = (await root.authenticate(token)).host
        registered = await root.registerProvider(
            className=class_name, provider=Provider(make_instance), usesRequest=uses_request
        )
    except capnp.KjException as error:
        if error.type == "DISCONNECTED":
            raise
        raise Fatal(f"{error.type}: {error.description}") from error
    # Kept (a local of this frame) while the provider serves: releasing it unregisters.
    registration = registered.registration  # noqa: F841
    print(f"registered {class_name}", flush=True)
    while True:
        await asyncio.sleep(PING_SECONDS)
        # Fails once the connection is lost.
        await root.listNamespaces()


async def serve(address, class_name, make_instance, token=None, reconnect=True, uses_request=False):
    """Serves `class_name` on the host at `address`, reconnecting (unless `reconnect` is false)
    when the connection is lost. With `uses_request`, the instances take their requests at
    `request` (streamed bodies) instead of `fetch`. Returns an exit status."""
    wait = 0.1
    while True:
        try:
            await serve_once(address, class_name, make_instance, token, uses_request)
        except Fatal as error:
            print(f"provider: {error}", file=sys.stderr)
            return 1
        except (capnp.KjException, OSError) as error:
            print(f"provider: connection lost: {error}", file=sys.stderr, flush=True)
            if not reconnect:
                return 1
        await asyncio.sleep(wait)
        wait = min(wait * 2, RECONNECT_SECONDS_MAX)


def main(description, class_name, make_instance, uses_request=False):
    """The command line of a provider: `ADDRESS [--token-file PATH] [--class NAME] [--once]`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("address", nargs="?", default="127.0.0.1:7450", help="HOST:PORT of duro serve")
    parser.add_argument("--token-file", help="the host's token (duro serve --token-file)")
    parser.add_argument("--class", dest="class_name", default=class_name, help=f"the class to serve (default: {class_name})")
    parser.add_argument("--once", action="store_true", help="exit when the connection is lost instead of connecting again")
    args = parser.parse_args()
    token = None
    if args.token_file:
        with open(args.token_file) as file:
            token = file.read().strip()
    try:
        return asyncio.run(
            capnp.run(
                serve(args.address, args.class_name, make_instance, token, not args.once, uses_request)
            )
        )
    except KeyboardInterrupt:
        return 0
