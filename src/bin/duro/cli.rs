//! The client commands of the `duro` binary: `fetch`, `ids`, `ls`. Each connects with
//! [`duro::client::Client`], makes its calls and prints the answers on stdout; errors go to
//! stderr, and the exit status says which kind of failure it was (see [`EXIT_REFUSED`]).

use std::future::Future;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};

use duro::Error;
use duro::client::{Client, ClientTls, NamespaceInfo, ObjectInfoPage};
use duro::id::ObjectId;
use duro::{Request, Response};

/// Exit status when an argument was refused, by the command or by the host (a bad ID, an
/// unknown namespace, a malformed header): fix the command. Also clap's status for usage
/// errors. Every other failure (the host unreachable, a broken stub, an overloaded host, a
/// failed object) exits with 1.
pub const EXIT_REFUSED: u8 = 2;

/// Where the server is.
#[derive(clap::Args, Debug, Clone)]
pub struct Connect {
    /// The server's address: HOST:PORT, or unix:PATH.
    #[arg(long, env = "DURO_CONNECT", default_value = duro::DEFAULT_LISTEN)]
    pub connect: duro::ListenAddr,
    /// Connect over TLS, to a server started with --tls-cert. Without --tls-ca, the server's
    /// certificate must be signed by a public CA (Mozilla's root set).
    #[arg(long, env = "DURO_TLS")]
    pub tls: bool,
    /// Connect over TLS (--tls is implied) and trust only the CA certificates of this PEM file:
    /// for a private CA, or a self-signed certificate.
    #[arg(long, env = "DURO_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// The name the server's certificate must carry, a DNS name or an IP address, when it is
    /// not the IP address of --connect [default: that address].
    #[arg(long, env = "DURO_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

impl Connect {
    /// Connects as the flags say: over TLS or not.
    async fn client(&self) -> Result<Client, Error> {
        let refused = |error: duro::tls::Error| Error::InvalidArgument(error.to_string());
        if !self.tls && self.tls_ca.is_none() {
            if self.tls_server_name.is_some() {
                let message = "--tls-server-name needs --tls or --tls-ca".to_owned();
                return Err(Error::InvalidArgument(message));
            }
            return Client::connect(&self.connect).await;
        }
        let mut tls = match &self.tls_ca {
            Some(path) => ClientTls::with_ca_pem(path).map_err(refused)?,
            None => ClientTls::new(),
        };
        if let Some(name) = &self.tls_server_name {
            tls = tls.server_name(name).map_err(refused)?;
        }
        Client::connect_tls(&self.connect, tls).await
    }

    /// The flags that connect the same way again, for a command line shown to the user.
    fn flags(&self) -> String {
        let mut flags = String::new();
        if self.connect.to_string() != duro::DEFAULT_LISTEN {
            flags.push_str(&format!(" --connect {}", self.connect));
        }
        match &self.tls_ca {
            Some(path) => flags.push_str(&format!(" --tls-ca {}", path.display())),
            None if self.tls => flags.push_str(" --tls"),
            None => {}
        }
        if let Some(name) = &self.tls_server_name {
            flags.push_str(&format!(" --tls-server-name {name}"));
        }
        flags
    }
}

/// Arguments of `duro fetch`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = FETCH_HELP)]
pub struct FetchArgs {
    /// The object's namespace, e.g. `counter`.
    pub namespace: String,
    /// The object's name, from which its ID is derived. Leave it out when giving --id: the
    /// argument after the namespace is then the PATH.
    #[arg(value_name = "NAME")]
    pub name: Option<String>,
    /// The path to request, with its query, e.g. /k/a?x=1 [default: /].
    #[arg(value_name = "PATH")]
    pub path: Option<String>,
    /// The object's 64-hex-digit ID, instead of its name.
    #[arg(long, value_name = "HEX")]
    pub id: Option<String>,
    /// The request method [default: GET, or POST when -d is given].
    #[arg(short = 'X', long = "request", value_name = "METHOD")]
    pub method: Option<String>,
    /// A request header, 'Name: value'. Repeat for more.
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// The request body: the text given; @FILE reads it from FILE, @- from stdin.
    #[arg(short = 'd', long = "data", value_name = "BODY")]
    pub data: Option<String>,
}

const FETCH_HELP: &str = "Prints the status line, the headers and the body, like `curl -i`.\n\n\
Examples:\n  \
duro fetch counter visits -X POST\n  \
duro fetch kv alice /k/greeting -X PUT -d hello\n  \
duro fetch kv alice /k/photo -X PUT -d @photo.jpg -H 'Content-Type: image/jpeg'\n  \
duro fetch counter --id $(duro ids counter --name visits) /\n\n\
Exit status: 0 when a response came back, whatever its HTTP status; 1 when the host could not \
be reached, the connection or the stub broke, the host was overloaded, or the object's code \
failed; 2 when an argument was refused (a bad ID, an unknown namespace, a malformed header, an \
unreadable file).";

/// Arguments of `duro ids`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = IDS_HELP)]
#[command(group(clap::ArgGroup::new("which").required(true)))]
pub struct IdsArgs {
    /// The namespace that mints the ID.
    pub namespace: String,
    /// Print the ID derived from NAME: the same every time, also after a restart.
    #[arg(long, value_name = "NAME", group = "which")]
    pub name: Option<String>,
    /// Print a fresh random ID: never the same twice.
    #[arg(long, group = "which")]
    pub unique: bool,
}

const IDS_HELP: &str = "Exit status: 0 on success; 1 when the host could not be reached or the \
connection broke; 2 when an argument was refused (an unknown namespace, a name over the host's \
limit).";

/// Arguments of `duro ls`.
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = LS_HELP)]
pub struct LsArgs {
    /// List this namespace's objects (those with stored data) instead of the namespaces.
    pub namespace: Option<String>,
    /// Most objects to list, from 1 to the host's list_objects_max (1000 by default).
    #[arg(long, default_value_t = 100, requires = "namespace")]
    pub limit: u32,
    /// List the objects after this hex ID: the last one of the previous page.
    #[arg(long, value_name = "HEX", requires = "namespace")]
    pub start_after: Option<String>,
}

const LS_HELP: &str = "Without a namespace, prints each namespace and its class. With one, \
prints the hex ID, the name (when it was reached by name) and the next alarm (when it has one, \
as `alarm 2026-11-29T20:40:00.000Z`: RFC 3339, UTC) of each of its objects, in ID order; when \
more follow, says on stderr how to list the next page.\n\n\
Exit status: 0 on success; 1 when the host could not be reached or the connection broke; 2 \
when an argument was refused (an unknown namespace, a bad --limit or --start-after).";

/// `duro fetch`: sends one HTTP request to an object and prints the response like `curl -i`.
pub fn fetch(connect: &Connect, args: &FetchArgs) -> ExitCode {
    let (target, request) = match fetch_target(args).and_then(|t| Ok((t, build_request(args)?))) {
        Ok(prepared) => prepared,
        Err(error) => return report(&error),
    };
    with_client(connect, |client| async move {
        let namespace = client.namespace(&args.namespace);
        let stub = match target {
            Target::Name(name) => namespace.get_by_name(name),
            // The host checks the ID at `get`: no round trip to check it first.
            Target::Id(id) => namespace.get(&id),
        };
        let response = stub.fetch(request).await?;
        write_stdout(&format_response(&response));
        Ok(())
    })
}

/// `duro ids`: prints the ID of a name, or a fresh one.
pub fn ids(connect: &Connect, args: &IdsArgs) -> ExitCode {
    with_client(connect, |client| async move {
        let namespace = client.namespace(&args.namespace);
        let id = match &args.name {
            Some(name) => namespace.id_from_name(name).await?,
            None => namespace.new_unique_id().await?,
        };
        write_stdout(format!("{id}\n").as_bytes());
        Ok(())
    })
}

/// `duro ls`: lists the namespaces, or one page of a namespace's objects.
pub fn ls(connect: &Connect, args: &LsArgs) -> ExitCode {
    with_client(connect, |client| async move {
        let Some(name) = &args.namespace else {
            let namespaces = client.list_namespaces().await?;
            write_stdout(format_namespaces(&namespaces).as_bytes());
            return Ok(());
        };
        let page = client
            .namespace(name)
            .list_object_info(args.start_after.as_deref(), args.limit)
            .await?;
        write_stdout(format_objects(&page).as_bytes());
        if let Some(next) = page.next_start_after() {
            eprintln!("{}", next_page_hint(connect, args, name, &next));
        }
        Ok(())
    })
}

/// Which object `duro fetch` addresses.
enum Target<'a> {
    Name(&'a str),
    Id(ObjectId),
}

fn fetch_target(args: &FetchArgs) -> Result<Target<'_>, Error> {
    match (&args.id, &args.name, &args.path) {
        (Some(_), _, Some(path)) => Err(Error::InvalidArgument(format!(
            "with --id, give no NAME: only the PATH (got the extra argument {path:?})"
        ))),
        (Some(hex), _, None) => Ok(Target::Id(ObjectId::from_hex(hex)?)),
        (None, Some(name), _) => Ok(Target::Name(name)),
        (None, None, _) => Err(Error::InvalidArgument(
            "give the object's NAME or its --id".into(),
        )),
    }
}

/// The request `duro fetch` sends, from its arguments.
fn build_request(args: &FetchArgs) -> Result<Request, Error> {
    // With --id the positional after the namespace is the path.
    let path = match &args.id {
        Some(_) => args.name.as_deref(),
        None => args.path.as_deref(),
    };
    let body = match &args.data {
        Some(data) => read_data(data)?,
        None => Bytes::new(),
    };
    let method = match (&args.method, &args.data) {
        (Some(method), _) => Method::from_bytes(method.as_bytes())
            .map_err(|_| Error::InvalidArgument(format!("invalid method {method:?}")))?,
        (None, Some(_)) => Method::POST,
        (None, None) => Method::GET,
    };
    let path = path.unwrap_or("/");
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = path
        .parse()
        .map_err(|e| Error::InvalidArgument(format!("invalid path {path:?}: {e}")))?;
    for header in &args.headers {
        let (name, value) = parse_header(header)?;
        request.headers_mut().append(name, value);
    }
    Ok(request)
}

/// The body of `-d`: the text itself, or a file's bytes with `@FILE` (`@-`: stdin).
fn read_data(data: &str) -> Result<Bytes, Error> {
    let unreadable = |source: &str, e: std::io::Error| {
        Error::InvalidArgument(format!("cannot read the body from {source}: {e}"))
    };
    match data.strip_prefix('@') {
        Some("-") => {
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .map_err(|e| unreadable("stdin", e))?;
            Ok(body.into())
        }
        Some(path) => std::fs::read(path)
            .map(Bytes::from)
            .map_err(|e| unreadable(path, e)),
        None => Ok(Bytes::copy_from_slice(data.as_bytes())),
    }
}

/// Parses `Name: value` (spaces around the value are dropped, as curl does).
fn parse_header(header: &str) -> Result<(HeaderName, HeaderValue), Error> {
    let invalid = |why: &str| Error::InvalidArgument(format!("invalid header {header:?}: {why}"));
    let (name, value) = header
        .split_once(':')
        .ok_or_else(|| invalid("expected 'Name: value'"))?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| invalid("bad name"))?;
    let value = HeaderValue::from_str(value.trim()).map_err(|_| invalid("bad value"))?;
    Ok((name, value))
}

/// The response as `curl -i` prints it: status line, headers, a blank line, the body as is.
fn format_response(response: &Response) -> Vec<u8> {
    let status = response.status();
    let reason = status.canonical_reason().unwrap_or("");
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", status.as_u16()).into_bytes();
    for (name, value) in response.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(response.body());
    out
}

/// One line per namespace: its name and its class, in aligned columns.
fn format_namespaces(namespaces: &[NamespaceInfo]) -> String {
    let width = namespaces.iter().map(|n| n.name.len()).max().unwrap_or(0);
    namespaces
        .iter()
        .map(|n| format!("{:width$}  {}\n", n.name, n.class_name))
        .collect()
}

/// One line per object: its hex ID, and its name when it has one.
fn format_objects(page: &ObjectInfoPage) -> String {
    let mut out = String::new();
    for object in &page.objects {
        out.push_str(&object.id.to_string());
        if let Some(name) = object.id.name() {
            out.push_str(&format!("  {name}"));
        }
        if let Some(at_ms) = object.alarm_ms {
            out.push_str(&format!("  alarm {}", format_rfc3339_ms(at_ms)));
        }
        out.push('\n');
    }
    out
}

/// `ms` since the Unix epoch as RFC 3339 in UTC with milliseconds, e.g.
/// `2026-11-29T20:40:00.000Z`. By hand (the civil-from-days conversion of Howard Hinnant's
/// date algorithms) rather than a date crate: it is the command's only date, and these dozen
/// lines cost less than a dependency.
pub(crate) fn format_rfc3339_ms(ms: u64) -> String {
    let (days, ms_of_day) = (ms / 86_400_000, ms % 86_400_000);
    // Days since 0000-03-01, in 400-year eras of 146,097 days; years begin in March.
    let z = days + 719_468;
    let (era, day_of_era) = (z / 146_097, z % 146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    let (hour, minute) = (ms_of_day / 3_600_000, ms_of_day / 60_000 % 60);
    let (second, milli) = (ms_of_day / 1000 % 60, ms_of_day % 1000);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z")
}

/// The command that lists the page after `next`.
fn next_page_hint(connect: &Connect, args: &LsArgs, namespace: &str, next: &str) -> String {
    let command = format!("duro ls{}", connect.flags());
    format!(
        "more objects follow; next page: {command} {namespace} --limit {} --start-after {next}",
        args.limit
    )
}

/// Connects, runs `body` with the client, and turns the outcome into an exit status.
pub(crate) fn with_client<F, Fut>(connect: &Connect, body: F) -> ExitCode
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<(), Error>>,
{
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("duro: starting a tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let client = connect.client().await?;
        body(client).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => report(&error),
    }
}

/// Prints `error` on stderr; the exit status tells a refused argument from other failures.
pub(crate) fn report(error: &Error) -> ExitCode {
    eprintln!("duro: {error}");
    match error {
        Error::InvalidArgument(_) => ExitCode::from(EXIT_REFUSED),
        _ => ExitCode::FAILURE,
    }
}

/// Writes to stdout; a closed stdout (`duro ls | head`) is not an error of the command.
pub(crate) fn write_stdout(bytes: &[u8]) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(bytes).and_then(|()| stdout.flush());
}

#[cfg(test)]
mod tests {
    use super::format_rfc3339_ms;

    #[test]
    fn times_format_as_rfc3339_utc_with_milliseconds() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (951_868_799_999, "2000-02-29T23:59:59.999Z"),
            (1_700_000_000_000, "2023-11-14T22:13:20.000Z"),
            (4_102_444_799_999, "2099-12-31T23:59:59.999Z"),
            (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
        ];
        for (ms, text) in cases {
            assert_eq!(format_rfc3339_ms(ms), text, "{ms}");
        }
    }
}
