//! The size of a call's parameters and results, for the bounds of the connection that carries
//! them.

use std::cell::Cell;
use std::rc::Rc;

use capnp::any_pointer;
use capnp::capability::Promise;
use capnp::private::capability::{PipelineHook, RequestHook, ResultsHook};

/// The size of the message under `root`, as its words count it: never above what the
/// message carrying it takes on the wire.
pub(super) fn message_bytes(root: capnp::Result<any_pointer::Reader<'_>>) -> capnp::Result<usize> {
    Ok(root?.target_size()?.word_count as usize * 8)
}

/// The results of a typed call as the object's method writes them: the caller's own, measured
/// once the method is done with them (when it drops them), for the bounds on what the
/// connection sends. `set_pipeline` is not passed on: calls the caller pipelined on the
/// capabilities in the results wait for the results, which wait for the output gate.
pub(super) struct Measured {
    /// `None` once handed on for a tail call.
    pub(super) inner: Option<Box<dyn ResultsHook>>,
    pub(super) bytes: Rc<Cell<usize>>,
    /// Whether `set_pipeline` is passed on: for calls passed on to another shard, whose host
    /// holds the results at its own output gate.
    pub(super) pipeline: bool,
}

impl Measured {
    fn inner(&mut self) -> capnp::Result<&mut Box<dyn ResultsHook>> {
        self.inner
            .as_mut()
            .ok_or_else(|| capnp::Error::failed("the results were handed on".into()))
    }
}

impl ResultsHook for Measured {
    fn get(&mut self) -> capnp::Result<any_pointer::Builder<'_>> {
        self.inner()?.get()
    }

    fn set_pipeline(&mut self) -> capnp::Result<()> {
        match self.pipeline {
            true => self.inner()?.set_pipeline(),
            false => Ok(()),
        }
    }

    fn tail_call(mut self: Box<Self>, request: Box<dyn RequestHook>) -> Promise<(), capnp::Error> {
        match self.inner.take() {
            Some(inner) => inner.tail_call(request),
            None => Promise::err(capnp::Error::failed("the results were handed on".into())),
        }
    }

    fn direct_tail_call(
        mut self: Box<Self>,
        request: Box<dyn RequestHook>,
    ) -> (Promise<(), capnp::Error>, Box<dyn PipelineHook>) {
        match self.inner.take() {
            Some(inner) => inner.direct_tail_call(request),
            // Never: a tail call takes the results once, and nothing else takes them.
            None => unreachable!("direct_tail_call on results handed on"),
        }
    }

    fn allow_cancellation(&self) {
        if let Some(inner) = &self.inner {
            inner.allow_cancellation();
        }
    }
}

impl Drop for Measured {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.as_mut() {
            let root = inner.get().map(|root| root.into_reader());
            self.bytes.set(message_bytes(root).unwrap_or(0));
        }
    }
}
