@0xbf8a15d31fdae23a;
# The interface of the class tests/typed.rs exercises: typed calls on stubs, and stubs passed
# as capabilities.

using Duro = import "/duro.capnp";

interface Probe {
  record @0 (label :Text) -> (count :UInt32, instance :UInt64);
  # Appends `label` to the object's log (in memory) and answers how many labels it holds, and
  # which instance (a number per construction) answered.

  transact @1 (label :Text, sleepMs :UInt32) -> ();
  # Logs "start <label>", runs a storage transaction that sleeps `sleepMs` inside it (holding
  # the input gate) and puts `label`, then logs "end <label>".

  put @2 (key :Text, value :Text) -> ();
  # A storage write; the answer leaves once it is durable.

  relay @3 (target :Duro.DurableObject, count :UInt32, prefix :Text) -> (counts :List(UInt32));
  # Calls `record` on `target` (cast to Probe) `count` times, all sent before any answer is
  # awaited, labels "<prefix><i>", and answers the counts in the order of the calls.

  introduce @4 (to :Duro.DurableObject, target :Text, count :UInt32) -> (counts :List(UInt32));
  # Gets a stub of the object named `target` of its own namespace from its Env, turns it into
  # a capability and has `to` relay `count` calls to it (labels "via-<i>").

  reader @5 () -> (reader :Reader);
  # The object's own capability to its log: not through the host.

  fail @6 (message :Text) -> ();
  # Returns an error with `message`.

  crash @7 () -> ();
  # Panics.

  stub @8 () -> (stub :Duro.DurableObject);
  # A stub to the object itself, made into a capability: through the host.

  big @9 (bytes :UInt32) -> (data :Data);
  # Answers `bytes` bytes of data.
}

interface Reader {
  count @0 () -> (count :UInt32);
  # How many labels the log holds.
}
