//! `echo`: answers 200 with a JSON description of the request it got:
//! `{"method": ..., "url": ..., "headers": [[name, value], ...], "body_base64": ...}`.

use base64::Engine;
use http::StatusCode;
use serde_json::json;

use crate::host::DurableObject;
use crate::message::{BoxError, Request, Response};
use crate::response;

pub struct Echo;

impl DurableObject for Echo {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        let headers: Vec<[String; 2]> = request
            .headers()
            .iter()
            .map(|(name, value)| {
                [
                    name.to_string(),
                    String::from_utf8_lossy(value.as_bytes()).into(),
                ]
            })
            .collect();
        let body = json!({
            "method": request.method().as_str(),
            "url": request.uri().to_string(),
            "headers": headers,
            "body_base64": base64::engine::general_purpose::STANDARD.encode(request.body()),
        });
        Ok(response::json(StatusCode::OK, &body))
    }
}
