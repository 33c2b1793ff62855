//! `kv`: one object's storage over HTTP (see the README for the routes).

use http::StatusCode;

use crate::{BoxError, DurableObject, Request, Response, State};

pub struct Kv {
    #[allow(dead_code)]
    state: State,
}

impl Kv {
    pub fn new(state: State) -> Kv {
        Kv { state }
    }
}

impl DurableObject for Kv {
    async fn fetch(&self, _request: Request) -> Result<Response, BoxError> {
        Ok(super::text(StatusCode::NOT_FOUND, "not yet\n"))
    }
}
