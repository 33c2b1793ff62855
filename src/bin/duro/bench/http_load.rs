//! The HTTP load generator: hyper HTTP/1.1 client connections with keep-alive, one request in
//! flight on each (HTTP/1.1 has no multiplexing), all driven from one thread. The same
//! generator drives duro's gateway and workerd, so their figures compare like for like.

use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::measure::{Budget, Driven, Run, drive, drive_all};

/// One keep-alive HTTP/1.1 connection.
pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
}

impl Connection {
    /// Connects and handshakes (HTTP/1.1). The connection is driven by a local task: call
    /// inside a `LocalSet`.
    pub async fn open(addr: SocketAddr) -> Result<Connection, String> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("TCP_NODELAY: {e}"))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake with {addr}: {e}"))?;
        tokio::task::spawn_local(connection);
        Ok(Connection { sender })
    }

    /// Sends one request and reads the whole answer: its status and body.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        body: &'static [u8],
    ) -> Result<(u16, Bytes), String> {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, "127.0.0.1")
            .body(Full::new(Bytes::from_static(body)))
            .map_err(|e| format!("building the request: {e}"))?;
        self.sender
            .ready()
            .await
            .map_err(|e| format!("connection lost: {e}"))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}

/// What a request of the workload is: its method and path, given its number.
pub type Target = Rc<dyn Fn(u64) -> (&'static str, String)>;

/// Sends one request within `timeout`: whether a server is there and answering 200.
pub async fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let mut connection = Connection::open(addr).await?;
        let (status, body) = connection.send("GET", path, b"").await?;
        if status == 200 {
            Ok(())
        } else {
            Err(format!(
                "GET {path} answered {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ))
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// Opens `count` connections.
pub async fn open_all(addr: SocketAddr, count: usize) -> Result<Vec<Connection>, String> {
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        connections.push(Connection::open(addr).await?);
    }
    Ok(connections)
}

/// One run: every connection sends the requests `target` names, one at a time, until
/// `budget` is spent (its op budget is split between the connections).
pub async fn run(
    connections: &mut [Connection],
    target: &Target,
    budget: Budget,
) -> Result<Run, String> {
    let per_connection = Budget {
        until: budget.until,
        ops_max: budget.ops_max / connections.len().max(1) as u64,
    };
    let count = connections.len() as u64;
    let drivers = connections.iter_mut().enumerate().map(|(c, connection)| {
        let connection = Rc::new(tokio::sync::Mutex::new(connection));
        let target = target.clone();
        async move {
            let driven: Driven = drive(1, per_connection, |i| {
                let (method, path) = target(i * count + c as u64);
                let connection = connection.clone();
                async move {
                    let mut connection = connection.lock().await;
                    let (status, body) = connection.send(method, &path, super::PAYLOAD).await?;
                    if status == 200 {
                        Ok(())
                    } else {
                        Err(format!(
                            "{method} {path} answered {status}: {}",
                            String::from_utf8_lossy(&body).trim()
                        ))
                    }
                }
            })
            .await?;
            Ok(driven)
        }
    });
    drive_all(drivers.collect()).await
}
