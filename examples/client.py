#!/usr/bin/env python3
"""Adds 1 to a built-in `counter` object of a duro host and prints its new value.

Uses pycapnp (`pip install pycapnp`, 2.x), which loads the wire contract, schema/duro.capnp,
at run time: no code generation. `namespace(...)`, `getByName(...)` and `fetch(...)` are
pipelined: the three calls travel together, in one round trip.

    duro serve &
    python3 examples/client.py 127.0.0.1:7450 visits

Over TLS, to `duro serve --tls-cert cert.pem --tls-key key.pem`, trusting the CA in ca.pem
(Python's ssl module does the handshake, under pycapnp's asyncio stream):

    python3 examples/client.py --tls-ca ca.pem 127.0.0.1:7450 visits
"""

import argparse
import asyncio
import os
import ssl
import sys

import capnp

SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "schema", "duro.capnp")


def split_address(address):
    """'HOST:PORT' (or '[IPv6]:PORT') -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"invalid address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def tls_context(tls, tls_ca):
    """The TLS context for --tls or --tls-ca, or None for plain TCP. The server's certificate
    must be valid for the host connected to (an IP address or a DNS name)."""
    if tls_ca:
        return ssl.create_default_context(cafile=tls_ca)
    if tls:
        return ssl.create_default_context()
    return None


def load_schema():
    """The wire contract. It uses streaming methods (`-> stream`), whose declarations live in
    `/capnp/stream.capnp`: pycapnp ships that file inside its package, so the directory above
    the package goes on the import path."""
    standard = os.path.dirname(os.path.dirname(capnp.__file__))
    return capnp.load(SCHEMA, imports=[standard])


async def increment(address, name, context=None):
    """Adds 1 to the counter `name` of the host at `address`, over TLS when `context` is an
    ssl.SSLContext; returns its new value."""
    duro = load_schema()
    host, port = split_address(address)
    connection = await capnp.AsyncIoStream.create_connection(host=host, port=port, ssl=context)
    client = capnp.TwoPartyClient(connection)
    root = client.bootstrap().cast_as(duro.Host)
    # Each call answers with a promise whose capabilities can be called before it resolves.
    stub = root.namespace("counter").namespace.getByName(name).stub
    reply = await stub.fetch({"method": "POST", "url": "/"})
    response = reply.response
    if response.status != 200:
        raise RuntimeError(f"the counter answered {response.status} {response.statusText}")
    return int(bytes(response.body).decode())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:7450", help="HOST:PORT")
    parser.add_argument("name", nargs="?", default="example", help="the counter's name")
    parser.add_argument("--tls", action="store_true", help="connect over TLS (system CAs)")
    parser.add_argument("--tls-ca", metavar="PEM", help="connect over TLS, trusting this CA")
    args = parser.parse_args()
    try:
        context = tls_context(args.tls, args.tls_ca)
        value = asyncio.run(capnp.run(increment(args.address, args.name, context)))
    except capnp.KjException as error:
        # error.type says what to do: DISCONNECTED (get a new stub), OVERLOADED (back off),
        # FAILED (the object's code failed, "remote: ...", or an argument was refused).
        print(f"client.py: {error.type}: {error.description}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as error:
        print(f"client.py: {error}", file=sys.stderr)
        return 1
    print(value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
