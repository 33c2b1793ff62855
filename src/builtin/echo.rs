//! `echo`: answers 200 with a JSON description of the request it got:
//! `{"method": ..., "url": ..., "headers": [[name, value], ...], "body_base64": ...}`.
//!
//! `POST /stream` answers with the request's body itself, streamed back as it arrives, of any
//! size: the host holds none of it whole.

use base64::Engine;
use http::StatusCode;
use serde_json::json;

use crate::host::DurableObject;
use crate::message::{BoxError, Request, Response, StreamRequest, StreamResponse};
use crate::response;

pub struct Echo;

impl DurableObject for Echo {
    async fn fetch_stream(&self, request: StreamRequest) -> Result<StreamResponse, BoxError> {
        if request.method() == http::Method::POST && request.uri().path() == "/stream" {
            let mut response = StreamResponse::new(request.into_body());
            let octets = http::HeaderValue::from_static("application/octet-stream");
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, octets);
            return Ok(response);
        }
        let (parts, body) = request.into_parts();
        let response = self
            .fetch(Request::from_parts(parts, body.bytes().await?))
            .await?;
        Ok(response.map(Into::into))
    }

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
