//! A to-do list per object, whose requests are routed by axum's `Router` rather than by hand.
//!
//! - `GET /items` → 200 with the items as JSON, oldest first: `[{"id": 1, "title": "milk"}]`.
//! - `POST /items` with `{"title": "milk"}` (`Content-Type: application/json`) → 201 with the
//!   new item; 409 once the list holds [`ITEMS_MAX`] items.
//! - `GET /items/{id}` → 200 with the item, or 404.
//! - `DELETE /items/{id}` → 200 with the deleted item, or 404.
//!
//! Anything else is answered by axum as a server built on it would: 404 for an unknown path,
//! 405 (with `Allow`) for a method the path does not take, 400, 415 or 422 for a path or body
//! its extractors refuse.
//!
//! Run it, with the HTTP gateway on:
//!
//! ```sh
//! cargo run --example router -- --http 127.0.0.1:8787 --data ./todo-data
//! curl -H 'content-type: application/json' -d '{"title": "milk"}' http://127.0.0.1:8787/todo/home/items
//! curl http://127.0.0.1:8787/todo/home/items
//! curl -X DELETE http://127.0.0.1:8787/todo/home/items/1
//! ```
//!
//! axum wants `Send` handlers, with `Send` futures, since a server may run them on any thread;
//! an object is `!Send` (its `State` holds `Rc`s) and runs on its host's thread. So axum only
//! routes and extracts: each handler returns an [`Action`], plain data that says what was asked,
//! and `fetch` carries it out on the object, outside axum. A request an extractor refuses never
//! reaches the object's code.

use axum::Router;
use axum::body::Body;
use axum::extract::{Json, Path};
use axum::response::IntoResponse;
use axum::routing::get;
use duro::storage::{self, ListOptions};
use duro::{BoxError, Builder, DurableObject, Request, Response, State, Storage, response};
use http::StatusCode;
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

/// Items a list holds: a list is for a person to read, and `GET /items` answers all of them.
pub const ITEMS_MAX: u64 = 100;

/// Longest title, in bytes: a stored item stays well within storage's value limit.
pub const TITLE_BYTES_MAX: usize = 1024;

/// Prefix of the keys of items, each followed by its id, zero-padded so key order is id order.
const ITEM_PREFIX: &str = "item/";
/// Key of the id the next item gets; ids are never reused.
const NEXT_ID_KEY: &str = "next_id";
/// Key of the number of items, kept to refuse the item past [`ITEMS_MAX`].
const COUNT_KEY: &str = "count";

/// What a request asks of the list, as axum's routes and extractors made it out. Plain data:
/// `Send`, `Sync` and `Clone`, as a response's extensions require.
#[derive(Clone, Debug)]
enum Action {
    List,
    Create(NewItem),
    Get(u64),
    Delete(u64),
}

/// The body of `POST /items`.
#[derive(Clone, Debug, Deserialize)]
struct NewItem {
    title: String,
}

/// An item, as stored and as answered.
#[derive(Debug, Serialize, Deserialize)]
struct Item {
    id: u64,
    title: String,
}

/// A handler's answer: the action, carried to `fetch` in the response's extensions.
impl IntoResponse for Action {
    fn into_response(self) -> axum::response::Response {
        let mut routed = axum::response::Response::default();
        routed.extensions_mut().insert(self);
        routed
    }
}

/// The routes: each handler only names its [`Action`], with what its extractors took.
fn routes() -> Router {
    let list = get(|| async { Action::List })
        .post(|Json(item): Json<NewItem>| async move { Action::Create(item) });
    let item = get(|Path(id): Path<u64>| async move { Action::Get(id) })
        .delete(|Path(id): Path<u64>| async move { Action::Delete(id) });
    Router::new()
        .route("/items", list)
        .route("/items/{id}", item)
}

/// A to-do list: see the module docs for its routes.
pub struct TodoList {
    state: State,
    /// Built once per activation; a clone per request is a reference count.
    routes: Router,
}

impl DurableObject for TodoList {
    async fn fetch(&self, request: Request) -> Result<Response, BoxError> {
        // A Router never fails (its error type is `Infallible`): every outcome is a response.
        let Ok(mut routed) = self.routes.clone().oneshot(request.map(Body::from)).await;
        match routed.extensions_mut().remove::<Action>() {
            Some(action) => self.perform(action).await,
            // axum's own answer: no such route, a wrong method, a refused path or body.
            None => {
                let (parts, body) = routed.into_parts();
                let body = body.collect().await?.to_bytes();
                Ok(Response::from_parts(parts, body))
            }
        }
    }
}

impl TodoList {
    async fn perform(&self, action: Action) -> Result<Response, BoxError> {
        let storage = self.state.storage();
        match action {
            Action::List => Ok(response::json(StatusCode::OK, &list(storage).await?)),
            Action::Create(new) => create(storage, &new.title).await,
            Action::Get(id) => Ok(found(storage.get(item_key(id)).await?)),
            Action::Delete(id) => Ok(found(delete(storage, id).await?)),
        }
    }
}

/// 200 with `item`, or 404.
fn found(item: Option<Item>) -> Response {
    match item {
        Some(item) => response::json(StatusCode::OK, &item),
        None => response::status(StatusCode::NOT_FOUND),
    }
}

/// The items, oldest first.
async fn list(storage: &Storage) -> Result<Vec<Item>, storage::Error> {
    let options = ListOptions {
        prefix: Some(ITEM_PREFIX.into()),
        limit: Some(ITEMS_MAX as usize),
        ..Default::default()
    };
    let items = storage.list::<Item>(&options).await?;
    Ok(items.into_iter().map(|(_key, item)| item).collect())
}

async fn create(storage: &Storage, title: &str) -> Result<Response, BoxError> {
    if title.len() > TITLE_BYTES_MAX {
        let refusal = format!("a title is at most {TITLE_BYTES_MAX} bytes\n");
        return Ok(response::text(StatusCode::UNPROCESSABLE_ENTITY, refusal));
    }
    // One transaction: the item, the next id and the count change together.
    let created = storage
        .transaction(|txn| async move {
            let count = txn.get::<u64>(COUNT_KEY).await?.unwrap_or(0);
            if count >= ITEMS_MAX {
                return Ok(None);
            }
            let id = txn.get::<u64>(NEXT_ID_KEY).await?.unwrap_or(1);
            let item = Item {
                id,
                title: title.to_owned(),
            };
            txn.put(item_key(id), &item).await?;
            txn.put(NEXT_ID_KEY, &(id + 1)).await?;
            txn.put(COUNT_KEY, &(count + 1)).await?;
            Ok::<_, storage::Error>(Some(item))
        })
        .await?;
    Ok(match created {
        Some(item) => response::json(StatusCode::CREATED, &item),
        None => {
            let refusal = format!("a list holds at most {ITEMS_MAX} items\n");
            response::text(StatusCode::CONFLICT, refusal)
        }
    })
}

/// Deletes item `id`; the item, if there was one.
async fn delete(storage: &Storage, id: u64) -> Result<Option<Item>, storage::Error> {
    storage
        .transaction(|txn| async move {
            let Some(item) = txn.get::<Item>(item_key(id)).await? else {
                return Ok(None);
            };
            txn.delete(item_key(id)).await?;
            let count = txn.get::<u64>(COUNT_KEY).await?.unwrap_or(1);
            txn.put(COUNT_KEY, &count.saturating_sub(1)).await?;
            Ok(Some(item))
        })
        .await
}

/// The key of item `id`: zero-padded, so keys sort as the ids do.
fn item_key(id: u64) -> String {
    format!("{ITEM_PREFIX}{id:020}")
}

/// Registers the class and binds the namespace `todo` to it.
pub fn register(builder: Builder) -> Builder {
    builder
        .class("todo_list", |state, _env| TodoList {
            state,
            routes: routes(),
        })
        .namespace("todo", "todo_list")
}

#[allow(dead_code)] // tests/examples.rs includes this file for the class alone.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// To-do lists, one object per list, routed with axum.
    #[derive(clap::Parser)]
    struct Args {
        /// Cap'n Proto address: HOST:PORT or unix:PATH.
        #[arg(long, default_value = duro::DEFAULT_LISTEN)]
        listen: duro::ListenAddr,
        /// HTTP gateway address.
        #[arg(long, default_value = "127.0.0.1:8787")]
        http: std::net::SocketAddr,
        /// Data directory.
        #[arg(long, default_value = "todo-data")]
        data: std::path::PathBuf,
    }
    let args = <Args as clap::Parser>::parse();
    register(duro::Server::builder())
        .listen(args.listen)
        .http(args.http)
        .data_dir(args.data)
        .run()?;
    Ok(())
}
