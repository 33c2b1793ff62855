#!/usr/bin/env python3
"""Adds to a typed counter (examples/typed_counter.rs) through its own interface and prints
its new value.

Uses pycapnp (`pip install pycapnp`, 2.x), which loads the wire contract (schema/duro.capnp)
and the counter's interface (examples/typed_counter.capnp) at run time: no code generation.
The stub that `getByName` returns is cast to `Counter`; `namespace(...)`, `getByName(...)` and
`increment(...)` are pipelined, so the three calls travel together, in one round trip.

    cargo run --example typed_counter &
    python3 examples/typed_client.py 127.0.0.1:7450 visits --by 5
"""

import argparse
import asyncio
import os
import sys

import capnp

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA_DIR = os.path.join(HERE, "..", "schema")


def load_schemas():
    """The wire contract and the counter's interface. The contract uses streaming methods
    (`-> stream`), declared in `/capnp/stream.capnp`, which pycapnp ships inside its package:
    the directory above the package goes on the import path."""
    standard = os.path.dirname(os.path.dirname(capnp.__file__))
    duro = capnp.load(os.path.join(SCHEMA_DIR, "duro.capnp"), imports=[standard])
    counter = capnp.load(os.path.join(HERE, "typed_counter.capnp"), imports=[standard])
    return duro, counter


def split_address(address):
    """'HOST:PORT' (or '[IPv6]:PORT') -> (host, port)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"invalid address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


async def increment(address, name, by, namespace="counter"):
    """Adds `by` to the counter `name` of the host at `address`; returns its new value."""
    duro, schema = load_schemas()
    host, port = split_address(address)
    connection = await capnp.AsyncIoStream.create_connection(host=host, port=port)
    client = capnp.TwoPartyClient(connection)
    root = client.bootstrap().cast_as(duro.Host)
    stub = root.namespace(namespace).namespace.getByName(name).stub
    # The stub answers the class's own interface too: cast it, and call.
    counter = stub.cast_as(schema.Counter)
    reply = await counter.increment(by)
    return reply.value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default="127.0.0.1:7450", help="HOST:PORT")
    parser.add_argument("name", nargs="?", default="example", help="the counter's name")
    parser.add_argument("--by", type=int, default=1, help="what to add (may be negative)")
    parser.add_argument("--namespace", default="counter", help="the counters' namespace")
    args = parser.parse_args()
    try:
        coroutine = increment(args.address, args.name, args.by, args.namespace)
        value = asyncio.run(capnp.run(coroutine))
    except capnp.KjException as error:
        # error.type says what to do: DISCONNECTED (get a new stub), OVERLOADED (back off),
        # FAILED (the object's code failed, "remote: ...", or an argument was refused),
        # UNIMPLEMENTED (the object's class does not export `Counter`).
        print(f"typed_client.py: {error.type}: {error.description}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"typed_client.py: {error}", file=sys.stderr)
        return 1
    print(value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
