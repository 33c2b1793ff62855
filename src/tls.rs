//! TLS: a server's certificate and key and a client's trust roots, loaded from PEM files into
//! rustls configurations, and the handshake of one connection on either side. The Cap'n Proto
//! listener, the HTTP gateway and the client share it. A leaf: it knows nothing of capnp or
//! hosts.
//!
//! rustls runs on the `ring` provider, chosen here explicitly rather than through rustls'
//! process-wide default, so that another crate of the program enabling a second provider
//! cannot make the configurations fail to build.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};

/// Longest a peer may take to finish its TLS handshake once its connection is accepted. The
/// connection holds a slot among the listener's bounded connections from the accept on, so
/// without this a client that connects and never speaks TLS (a plain-TCP client waiting for
/// the server to speak, or a slow-loris) would hold its slot forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a TLS configuration could not be made. Each names the file at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// The file is not valid PEM.
    #[error("{} is not valid PEM: {source}", path.display())]
    Pem { path: PathBuf, source: pem::Error },
    /// The file holds no `CERTIFICATE` section.
    #[error("{} holds no PEM certificate (BEGIN CERTIFICATE)", path.display())]
    NoCertificate { path: PathBuf },
    /// The file holds no private key section.
    #[error("{} holds no PEM private key (BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)", path.display())]
    NoKey { path: PathBuf },
    /// rustls refused the certificate chain and key: e.g. the key does not match the
    /// certificate, or is of a kind it does not support.
    #[error("the certificate {} and the key {} cannot be used together: {source}", cert.display(), key.display())]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    /// A certificate of the CA file is not a usable trust anchor.
    #[error("{} holds a CA certificate that cannot be trusted: {source}", path.display())]
    Ca {
        path: PathBuf,
        source: rustls::Error,
    },
    /// The name given for the server's certificate is neither a DNS name nor an IP address.
    #[error("invalid TLS server name {0:?}: expected a DNS name or an IP address")]
    ServerName(String),
}

/// The server side: a certificate chain and its private key. Cheap to clone.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl ServerTls {
    /// Loads the certificate chain of the PEM file `cert` (the server's certificate first, then
    /// any intermediates) and the private key of the PEM file `key` (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<ServerTls, Error> {
        let (cert, key) = (cert.as_ref(), key.as_ref());
        let chain = read_certificates(cert)?;
        let private_key =
            PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|source| match source {
                pem::Error::NoItemsFound => Error::NoKey { path: key.into() },
                source => Error::Pem {
                    path: key.into(),
                    source,
                },
            })?;
        let identity = |source| Error::Identity {
            cert: cert.into(),
            key: key.into(),
            source,
        };
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(identity)?
            .with_no_client_auth()
            .with_single_cert(chain, private_key)
            .map_err(identity)?;
        Ok(ServerTls::from_config(Arc::new(config)))
    }

    /// A server side made by the caller, e.g. with client certificates required.
    pub fn from_config(config: Arc<rustls::ServerConfig>) -> ServerTls {
        ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
        }
    }

    /// Runs the server side of the handshake on `stream`, for at most [`HANDSHAKE_TIMEOUT`].
    pub async fn accept<S>(&self, stream: S) -> io::Result<tokio_rustls::server::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(stream)).await {
            Ok(accepted) => accepted,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the TLS handshake took longer than {HANDSHAKE_TIMEOUT:?}"),
            )),
        }
    }
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

/// The client side: which certificate authorities it trusts, and which name the server's
/// certificate must carry. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    connector: tokio_rustls::TlsConnector,
    /// The name checked against the server's certificate; `None` for the IP address connected
    /// to.
    server_name: Option<ServerName<'static>>,
}

impl ClientTls {
    /// Trusts the public certificate authorities (Mozilla's root set, compiled in).
    pub fn new() -> ClientTls {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        ClientTls::from_roots(roots)
    }

    /// Trusts only the CA certificates of the PEM file `path`: for a server whose certificate
    /// a private CA signed (or a self-signed one, given as its own CA).
    pub fn with_ca_pem(path: impl AsRef<Path>) -> Result<ClientTls, Error> {
        let path = path.as_ref();
        let mut roots = rustls::RootCertStore::empty();
        for certificate in read_certificates(path)? {
            roots.add(certificate).map_err(|source| Error::Ca {
                path: path.into(),
                source,
            })?;
        }
        Ok(ClientTls::from_roots(roots))
    }

    /// A client side made by the caller, e.g. with a client certificate.
    pub fn from_config(config: Arc<rustls::ClientConfig>) -> ClientTls {
        ClientTls {
            connector: tokio_rustls::TlsConnector::from(config),
            server_name: None,
        }
    }

    /// The name the server's certificate must be valid for, a DNS name or an IP address, when
    /// it is not the IP address connected to (the default).
    pub fn server_name(mut self, name: &str) -> Result<ClientTls, Error> {
        let name = ServerName::try_from(name.to_owned())
            .map_err(|_| Error::ServerName(name.to_owned()))?;
        self.server_name = Some(name);
        Ok(self)
    }

    /// Runs the client side of the handshake on `stream`, a connection to `ip`. A certificate
    /// the server's name or the trusted CAs do not vouch for fails with an error that says so.
    pub async fn connect<S>(
        &self,
        ip: IpAddr,
        stream: S,
    ) -> io::Result<tokio_rustls::client::TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name = self
            .server_name
            .clone()
            .unwrap_or_else(|| ServerName::from(ip));
        let shown = name.to_str().into_owned();
        self.connector
            .connect(name, stream)
            .await
            .map_err(|error| io::Error::new(error.kind(), format!("TLS with {shown}: {error}")))
    }

    fn from_roots(roots: rustls::RootCertStore) -> ClientTls {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        ClientTls::from_config(Arc::new(config))
    }
}

impl Default for ClientTls {
    fn default() -> ClientTls {
        ClientTls::new()
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })
}

/// Every certificate of the PEM file `path`; at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certificates = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem {
            path: path.into(),
            source,
        })?;
    if certificates.is_empty() {
        return Err(Error::NoCertificate { path: path.into() });
    }
    Ok(certificates)
}
