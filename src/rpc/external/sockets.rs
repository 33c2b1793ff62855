//! `ObjectSocket`: one of the object's WebSockets as an external instance sees it.
//!
//! The sockets are the host's (the hibernation model of [`crate::host::WebSocket`]): an
//! instance gets a capability to one from `ObjectContext.acceptWebSocket`, from
//! `getWebSockets`, and with each WebSocket event, and passes its calls to the host's handle.
//! A capability is valid while the binding that handed it out lasts ([`Alive`]): once the
//! object is evicted or reset, its calls fail with `disconnected`, so a provider that kept one
//! can never send on behalf of an activation that is gone (the next event hands the new
//! instance a new capability to the same socket).
//!
//! A send or close goes through the object's input gate as a storage call does
//! ([`Turns::enter_now`]), so that it takes its place after the storage calls the instance
//! made before it: the host's handle then holds the message until those writes are durable.

use std::future::Future;
use std::rc::{Rc, Weak};

use bytes::Bytes;

use super::turns::Turns;
use crate::error::Error;
use crate::host::WebSocket;
use crate::wire::duro_capnp::object_socket;

/// What a binding to an instance holds while it lasts, and its sockets' capabilities weakly.
pub(super) type Alive = Rc<()>;

/// The `ObjectSocket` of `socket`, for the binding `alive`.
pub(super) fn client(socket: WebSocket, alive: &Alive, turns: &Rc<Turns>) -> object_socket::Client {
    capnp_rpc::new_client(SocketServer {
        socket,
        alive: Rc::downgrade(alive),
        turns: turns.clone(),
    })
}

struct SocketServer {
    socket: WebSocket,
    alive: Weak<()>,
    turns: Rc<Turns>,
}

impl SocketServer {
    /// Runs `op` on the socket through the gate, if the binding lives (see the module docs).
    fn run<F>(&self, op: F) -> impl Future<Output = capnp::Result<()>> + 'static + use<F>
    where
        F: FnOnce(&WebSocket) -> Result<(), Error> + 'static,
    {
        let alive = self.alive.upgrade().is_some();
        let socket = self.socket.clone();
        let turns = self.turns.clone();
        // Done at dispatch when the gate lets it in now; else it waits for the gate.
        let step = match alive.then(|| turns.enter_now()).flatten() {
            Some(entry) => {
                let done = op(&socket).map_err(capnp::Error::from);
                drop(entry);
                Ok(done)
            }
            None => Err(op),
        };
        async move {
            if !alive {
                return Err(gone());
            }
            match step {
                Ok(done) => done,
                Err(op) => {
                    let _entry = turns.enter().await;
                    Ok(op(&socket)?)
                }
            }
        }
    }
}

fn gone() -> capnp::Error {
    capnp::Error::disconnected(
        "the object was evicted or reset: this socket capability is no longer valid; the \
         socket stays open, and the next event hands the new instance a new one"
            .into(),
    )
}

impl object_socket::Server for SocketServer {
    fn send_text(
        self: Rc<Self>,
        params: object_socket::SendTextParams,
        _: object_socket::SendTextResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let text = params.get().and_then(|p| Ok(p.get_text()?.to_string()?));
        let sent = text.map(|text| self.run(move |socket| socket.send(text)));
        async move { sent?.await }
    }

    fn send_data(
        self: Rc<Self>,
        params: object_socket::SendDataParams,
        _: object_socket::SendDataResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let data = params
            .get()
            .and_then(|p| Ok(Bytes::copy_from_slice(p.get_data()?)));
        let sent = data.map(|data| self.run(move |socket| socket.send(data)));
        async move { sent?.await }
    }

    fn close(
        self: Rc<Self>,
        params: object_socket::CloseParams,
        _: object_socket::CloseResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let close = params
            .get()
            .and_then(|p| Ok((p.get_code(), p.get_reason()?.to_string()?)));
        let closed =
            close.map(|(code, reason)| self.run(move |socket| socket.close(code, &reason)));
        async move { closed?.await }
    }

    async fn tags(
        self: Rc<Self>,
        _: object_socket::TagsParams,
        mut results: object_socket::TagsResults,
    ) -> capnp::Result<()> {
        self.alive.upgrade().ok_or_else(gone)?;
        let tags = self.socket.tags();
        let mut list = results.get().init_tags(tags.len() as u32);
        for (at, tag) in tags.iter().enumerate() {
            list.set(at as u32, tag);
        }
        Ok(())
    }

    async fn set_attachment(
        self: Rc<Self>,
        params: object_socket::SetAttachmentParams,
        _: object_socket::SetAttachmentResults,
    ) -> capnp::Result<()> {
        self.alive.upgrade().ok_or_else(gone)?;
        let bytes = Bytes::copy_from_slice(params.get()?.get_attachment()?);
        Ok(self.socket.set_attachment_bytes(bytes)?)
    }

    async fn attachment(
        self: Rc<Self>,
        _: object_socket::AttachmentParams,
        mut results: object_socket::AttachmentResults,
    ) -> capnp::Result<()> {
        self.alive.upgrade().ok_or_else(gone)?;
        if let Some(bytes) = self.socket.attachment_bytes() {
            results.get().set_attachment(&bytes);
            results.get().set_found(true);
        }
        Ok(())
    }

    async fn is_closed(
        self: Rc<Self>,
        _: object_socket::IsClosedParams,
        mut results: object_socket::IsClosedResults,
    ) -> capnp::Result<()> {
        results.get().set_closed(self.socket.is_closed());
        Ok(())
    }
}
