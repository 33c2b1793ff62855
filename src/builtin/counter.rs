//! `counter`: a durable counter. `POST` (any path) adds 1 and answers the new value as decimal
//! text; `GET` answers the current value. The answer to a `POST` leaves only once the increment
//! is durable.

use http::{Method, StatusCode};

use crate::{BoxError, DurableObject, Request, Response, State};

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
            Method::GET => Ok(super::text(StatusCode::OK, value.to_string())),
            Method::POST => {
                storage.put("value", &(value + 1)).await?;
                Ok(super::text(StatusCode::OK, (value + 1).to_string()))
            }
            _ => Ok(super::text(
                StatusCode::METHOD_NOT_ALLOWED,
                "use GET or POST\n",
            )),
        }
    }
}
