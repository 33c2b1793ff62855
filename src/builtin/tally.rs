//! `tally`: a durable counter that also numbers its own instances, to check from outside that
//! an object never runs two live instances at once (the cluster's tests do).
//!
//! Each instance, on its first request, adds 1 to the stored count of activations and keeps the
//! new count as its number. `POST` (any path) adds 1 to the counter and answers
//! `VALUE ACTIVATION\n`; `GET` answers the same without adding. Both leave only once their
//! writes are durable. One instance at a time means that the activation numbers a client sees,
//! in the order of the answers, never go back: a higher number means a newer instance, and a
//! lower one arriving after it would be an older instance still serving.

use std::cell::Cell;

use http::{Method, StatusCode};

use crate::host::{DurableObject, State};
use crate::message::{BoxError, Request, Response};
use crate::response;

pub struct Tally {
    state: State,
    /// This instance's number, once its first request took one.
    activation: Cell<u64>,
}

impl Tally {
    pub fn new(state: State) -> Tally {
        Tally {
            state,
            activation: Cell::new(0),
        }
    }
}

impl DurableObject for Tally {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let storage = self.state.storage();
        if self.activation.get() == 0 {
            let activation = storage.get::<u64>("activations").await?.unwrap_or(0) + 1;
            storage.put("activations", &activation).await?;
            self.activation.set(activation);
        }
        let activation = self.activation.get();
        let value = storage.get::<u64>("value").await?.unwrap_or(0);
        let value = match *request.method() {
            Method::GET => value,
            Method::POST => {
                storage.put("value", &(value + 1)).await?;
                value + 1
            }
            _ => {
                return Ok(response::text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "use GET or POST\n",
                ));
            }
        };
        Ok(response::text(
            StatusCode::OK,
            format!("{value} {activation}\n"),
        ))
    }
}
