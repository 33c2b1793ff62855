@0x87cbf8e90aa3a3ea;
# The interface of examples/typed_counter.rs: a durable counter with typed methods. A stub of
# that class answers it besides `DurableObject` (schema/duro.capnp): cast the stub that
# `Namespace.getByName` returns to `Counter` and call it, pipelined, in one round trip.
#
# Each call is delivered to the object as `fetch` is: in the stub's order with its other calls,
# through the object's input gate, and answered only once the writes made before the answer
# are durable.

interface Counter {
  increment @0 (by :Int64) -> (value :Int64);
  # Adds `by` (a negative `by` subtracts) and answers the new value, once it is durable. A sum
  # that overflows fails and changes nothing.

  get @1 () -> (value :Int64);
  # The value: 0 for a counter never incremented.
}
