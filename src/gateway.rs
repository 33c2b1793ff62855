//! The HTTP gateway: HTTP/1.1 in front of the host (to be built).

use crate::host::Host;

/// Options of the HTTP gateway.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// Largest request body accepted (default 1 MiB); larger requests get 413.
    pub body_bytes_max: usize,
}

impl Default for GatewayOptions {
    fn default() -> GatewayOptions {
        GatewayOptions {
            body_bytes_max: 1 << 20,
        }
    }
}

/// Serves HTTP on `listener` until the future is dropped. Runs on the host's event loop.
pub async fn serve(host: Host, listener: tokio::net::TcpListener, options: GatewayOptions) {
    let _ = (host, listener, options);
    std::future::pending::<()>().await
}
