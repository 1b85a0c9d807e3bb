//! The streaming side of a watch: replayed events, live events, bookmarks, stalls and cut-offs.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use futures::Stream;
use hyper::body::Frame;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior};

use super::{BodyError, Change, Control, Filter, Kind};

/// One open watch.
pub(super) struct WatchStream {
    pub(super) kind: Kind,
    pub(super) filter: Filter,
    /// Rendered watch events waiting to be sent (replayed history first, then live ones).
    pub(super) backlog: VecDeque<Value>,
    pub(super) events: broadcast::Receiver<Arc<Change>>,
    pub(super) control: watch::Receiver<Control>,
    /// The `Control::generation` this watch was opened in; a newer one cuts it off.
    pub(super) generation: u64,
    /// The resourceVersion bookmarks carry: every change up to it has been queued.
    pub(super) progress: u64,
    pub(super) bookmarks: Option<Interval>,
    pub(super) deadline: Instant,
}

/// What a watch does next.
enum Next {
    Send(Value),
    /// Ends the response cleanly (the client re-watches from its last resourceVersion).
    End,
    /// Breaks the connection without finishing the chunked body.
    Cut,
}

impl WatchStream {
    /// Builds the bookmark ticker, if bookmarks were asked for and the interval is not zero.
    pub(super) fn ticker(every: std::time::Duration) -> Option<Interval> {
        (!every.is_zero()).then(|| {
            let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
            ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
            ticker
        })
    }

    /// The response body: newline-delimited JSON watch events.
    pub(super) fn into_body(self) -> impl Stream<Item = Result<Frame<Bytes>, BodyError>> + Send {
        futures::stream::unfold(Some(self), |state| async move {
            let mut this = state?;
            match this.next().await {
                Next::Send(event) => {
                    let mut line = Vec::new();
                    write_line(&mut line, &event);
                    Some((Ok(Frame::data(Bytes::from(line))), Some(this)))
                }
                Next::End => None,
                Next::Cut => Some((Err("watch cut off by the test API server".into()), None)),
            }
        })
    }

    async fn next(&mut self) -> Next {
        loop {
            let control = self.control.borrow_and_update().clone();
            if control.generation != self.generation || !control.available {
                return Next::Cut;
            }
            if control.stalled.contains(&self.kind) {
                // A stalled watch is silent: no events, no bookmarks, no timeout.
                if self.control.changed().await.is_err() {
                    return Next::End;
                }
                continue;
            }
            if let Some(event) = self.backlog.pop_front() {
                return Next::Send(event);
            }
            tokio::select! {
                changed = self.control.changed() => if changed.is_err() { return Next::End },
                () = tokio::time::sleep_until(self.deadline) => return Next::End,
                received = self.events.recv() => match received {
                    Ok(change) => {
                        self.progress = change.rv;
                        if let Some(event) = self.filter.event(&change) {
                            self.backlog.push_back(event);
                        }
                    }
                    // Fell too far behind (or the server is gone): the client must re-watch.
                    Err(_) => return Next::Cut,
                },
                () = tick(&mut self.bookmarks) => return Next::Send(bookmark(self.kind, self.progress, false)),
            }
        }
    }
}

async fn tick(ticker: &mut Option<Interval>) {
    match ticker {
        Some(ticker) => _ = ticker.tick().await,
        None => std::future::pending().await,
    }
}

/// A BOOKMARK watch event at `rv`; `initial_end` marks the end of `sendInitialEvents`.
pub(super) fn bookmark(kind: Kind, rv: u64, initial_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({
        "type": "BOOKMARK",
        "object": {"kind": kind.name(), "apiVersion": kind.api_version(), "metadata": metadata},
    })
}

/// Appends a watch event and its newline, `type` before `object` as the real server writes it
/// (a client reading `object` first has to buffer it until it learns the type).
pub(super) fn write_line(out: &mut Vec<u8>, event: &Value) {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        #[serde(rename = "type")]
        kind: &'a Value,
        object: &'a Value,
    }
    let line = Line { kind: &event["type"], object: &event["object"] };
    serde_json::to_writer(&mut *out, &line).expect("JSON values serialize");
    out.push(b'\n');
}
