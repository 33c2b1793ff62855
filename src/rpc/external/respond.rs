//! The host's side of `DurableObject.request` toward an external instance: the request body
//! written to the instance's `requestBody` as it arrives ([`upload`]), and the
//! `ResponseContext` through which the instance answers ([`context`]), whose `startResponse`
//! becomes the [`StreamResponse`] the proxy hands to the host.
//!
//! A streamed response body flows through a [`Body::channel`]: each `write` of the instance
//! returns once the channel took its bytes, and the channel holds at most
//! [`CHANNEL_BYTES_MAX`](crate::body::CHANNEL_BYTES_MAX) unread, so capnp's flow control holds
//! the instance back while the caller is behind. `end` finishes the body; the stream released
//! without `end` (the instance broke it off, or its provider went) drops the channel's writer,
//! which breaks the body off: the caller's read of it fails.

use std::cell::RefCell;
use std::future::{Future, ready};
use std::rc::Rc;

use futures::FutureExt;
use futures::future::LocalBoxFuture;
use tokio::sync::oneshot;

use crate::body::{Body, BodySender};
use crate::message::StreamResponse;
use crate::wire::convert;
use crate::wire::duro_capnp::{byte_stream, response_context};

/// A host-side `ResponseContext` for one request, and where its response head arrives.
pub(super) fn context() -> (response_context::Client, oneshot::Receiver<StreamResponse>) {
    let (head, arrived) = oneshot::channel();
    let context = capnp_rpc::new_client(HostContext {
        head: RefCell::new(Some(head)),
    });
    (context, arrived)
}

/// Writes `body` to the instance's `requestBody`, a write at a time (each waits for capnp's
/// flow control, so the caller's body is read at the instance's pace), then `end`. A body
/// that broke off is released without `end`; a refused write (the instance stopped reading)
/// stops the upload.
pub(super) async fn upload(mut body: Body, stream: byte_stream::Client) {
    while let Some(chunk) = body.chunk().await {
        let Ok(chunk) = chunk else {
            return;
        };
        if !crate::wire::stream::write_chunk(&stream, &chunk).await {
            return;
        }
    }
    let _ = stream.end_request().send().promise.await;
}

/// Why a `request` call ended without a response.
pub(super) enum Unanswered {
    /// The call failed.
    Failed(capnp::Error),
    /// The call returned, and `startResponse` was never called.
    Returned,
}

/// Waits for the instance's answer to a `request` call: its response head, from `head`. The
/// call (`reply`) and the request body's upload go on after the head arrived, on a task of
/// their own: the body may stream both ways while the host hands the response on.
pub(super) async fn answer(
    reply: LocalBoxFuture<'static, capnp::Result<()>>,
    upload: LocalBoxFuture<'static, ()>,
    mut head: oneshot::Receiver<StreamResponse>,
) -> Result<StreamResponse, Unanswered> {
    let mut reply = reply;
    let mut upload = upload.fuse();
    let mut head_open = true;
    loop {
        tokio::select! {
            arrived = &mut head, if head_open => match arrived {
                Ok(response) => {
                    tokio::task::spawn_local(async move {
                        let _ = futures::join!(reply, upload);
                    });
                    return Ok(response);
                }
                // The context was released unanswered: the call's result says why.
                Err(_) => head_open = false,
            },
            returned = &mut reply => {
                // `startResponse` may have arrived just before the call returned.
                if let Ok(response) = head.try_recv() {
                    tokio::task::spawn_local(upload);
                    return Ok(response);
                }
                return Err(match returned {
                    Err(error) => Unanswered::Failed(error),
                    Ok(()) => Unanswered::Returned,
                });
            }
            () = &mut upload => {}
        }
    }
}

/// The `ResponseContext` the host hands to an instance with a request.
struct HostContext {
    /// Where the response head goes; taken by the first `startResponse`.
    head: RefCell<Option<oneshot::Sender<StreamResponse>>>,
}

impl response_context::Server for HostContext {
    fn start_response(
        self: Rc<Self>,
        params: response_context::StartResponseParams,
        mut results: response_context::StartResponseResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready((|| {
            let params = params.get()?;
            let response = convert::response_from_capnp(params.get_response()?)?;
            let head = self.head.borrow_mut().take().ok_or_else(|| {
                capnp::Error::failed("startResponse was called already: answer once".into())
            })?;
            let response = if params.get_body_follows() {
                let (sender, body) = Body::channel();
                let stream: byte_stream::Client = capnp_rpc::new_client(ResponseBody {
                    sender: RefCell::new(Some(sender)),
                });
                results.get().set_body(stream);
                // The instance's first writes may be pipelined on `body`.
                results.set_pipeline()?;
                response.map(|_| body)
            } else {
                response.map(Body::from)
            };
            head.send(response).map_err(|_| {
                capnp::Error::failed("the request was cancelled before its response".into())
            })
        })())
    }

    fn start_web_socket(
        self: Rc<Self>,
        _: response_context::StartWebSocketParams,
        _: response_context::StartWebSocketResults,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        ready(Err(capnp::Error::failed(
            "an external instance accepts a WebSocket with ObjectContext.acceptWebSocket and \
             answers with startResponse, status 101: the host holds the socket"
                .into(),
        )))
    }
}

/// A response body's `ByteStream`, written by the instance (see the module docs). capnp-rpc
/// runs its `-> stream` writes one after another, in order.
struct ResponseBody {
    /// `None` once ended, and while a write waits for room.
    sender: RefCell<Option<BodySender>>,
}

impl byte_stream::Server for ResponseBody {
    fn write(
        self: Rc<Self>,
        params: byte_stream::WriteParams,
    ) -> impl Future<Output = capnp::Result<()>> + 'static {
        let chunk = params
            .get()
            .and_then(|p| Ok(bytes::Bytes::copy_from_slice(p.get_bytes()?)));
        async move {
            let chunk = chunk?;
            let Some(mut sender) = self.sender.borrow_mut().take() else {
                return Err(capnp::Error::failed(
                    "the response body was ended already".into(),
                ));
            };
            if sender.send(chunk).await.is_err() {
                return Err(capnp::Error::failed(
                    "the caller stopped reading the response body".into(),
                ));
            }
            *self.sender.borrow_mut() = Some(sender);
            Ok(())
        }
    }

    async fn end(
        self: Rc<Self>,
        _: byte_stream::EndParams,
        _: byte_stream::EndResults,
    ) -> capnp::Result<()> {
        let sender =
            self.sender.borrow_mut().take().ok_or_else(|| {
                capnp::Error::failed("the response body was ended already".into())
            })?;
        sender.finish();
        Ok(())
    }
}
