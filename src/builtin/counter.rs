//! `counter`: a durable counter. `POST` (any path) adds 1 and answers the new value as decimal
//! text and a newline (`1\n`); `GET` answers the current value the same way. The answer to a
//! `POST` leaves only once the increment is durable.

use http::{Method, StatusCode};

use crate::host::{DurableObject, State};
use crate::message::{BoxError, Request, Response};
use crate::response;

pub struct Counter {
    state: State,
}

impl Counter {
    pub fn new(state: State) -> Counter {
        Counter { state }
    }
}

impl DurableObject for Counter {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let storage = self.state.storage();
        let value = storage.get::<u64>("value").await?.unwrap_or(0);
        match *request.method() {
            Method::GET => Ok(response::text(StatusCode::OK, format!("{value}\n"))),
            Method::POST => {
                storage.put("value", &(value + 1)).await?;
                Ok(response::text(StatusCode::OK, format!("{}\n", value + 1)))
            }
            _ => Ok(response::text(
                StatusCode::METHOD_NOT_ALLOWED,
                "use GET or POST\n",
            )),
        }
    }
}
