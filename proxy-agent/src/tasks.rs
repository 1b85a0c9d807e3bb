//! The agent's long-running tasks (the source, the sync loop, the interface rescan). Each must
//! run until the agent stops, so the first to end, by a panic, an error or a plain return,
//! stops the agent with a non-zero status and the cause in the log, and the DaemonSet restarts
//! it. A dropped [`tokio::task::JoinError`] once made a panicked sync loop exit with status 0.

use std::{any::Any, collections::HashMap, error::Error as StdError, future::Future};

use tokio::task::{Id, JoinSet};

/// What a task returns: `Err` when it fails.
pub(crate) type TaskResult = Result<(), Box<dyn StdError + Send + Sync>>;

/// Why a task ended, though every task should run until the agent stops.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TaskEnded {
    /// The task panicked (a bug: the log has the panic's location).
    #[error("the {task} task panicked: {message}")]
    Panicked {
        /// The task's name.
        task: &'static str,
        /// The panic's message.
        message: String,
    },
    /// The task failed.
    #[error("the {task} task failed")]
    Failed {
        /// The task's name.
        task: &'static str,
        /// Its error.
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    /// The task returned (the sync loop does when every source has closed).
    #[error("the {task} task ended; it should run until the agent stops")]
    Returned {
        /// The task's name.
        task: &'static str,
    },
    /// The task was cancelled; nothing cancels tasks before the agent stops, so a bug too.
    #[error("the {task} task was cancelled")]
    Cancelled {
        /// The task's name.
        task: &'static str,
    },
}

/// The agent's long-running tasks, by name. Dropping it aborts those still running.
#[derive(Debug, Default)]
pub(crate) struct Tasks {
    set: JoinSet<TaskResult>,
    names: HashMap<Id, &'static str>,
}

impl Tasks {
    /// Runs `task` as `name` on the current runtime.
    pub(crate) fn spawn(&mut self, name: &'static str, task: impl Future<Output = TaskResult> + Send + 'static) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits until the first task ends and says why; with no task, waits forever.
    pub(crate) async fn first_ended(&mut self) -> TaskEnded {
        let Some(joined) = self.set.join_next_with_id().await else { return std::future::pending().await };
        let name = |id: Id| self.names.get(&id).copied().unwrap_or("unnamed");
        match joined {
            Ok((id, Ok(()))) => TaskEnded::Returned { task: name(id) },
            Ok((id, Err(source))) => TaskEnded::Failed { task: name(id), source },
            Err(error) => {
                let task = name(error.id());
                match error.try_into_panic() {
                    Ok(payload) => TaskEnded::Panicked { task, message: panic_message(payload.as_ref()).to_owned() },
                    Err(_) => TaskEnded::Cancelled { task },
                }
            }
        }
    }
}

/// The text of a panic's payload (`panic!` with a literal gives `&str`, with arguments a
/// `String`).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> &str {
    match payload.downcast_ref::<&str>() {
        Some(text) => text,
        None => payload.downcast_ref::<String>().map_or("(a panic without a message)", String::as_str),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forever() -> impl Future<Output = TaskResult> + Send + 'static {
        std::future::pending()
    }

    #[tokio::test]
    async fn a_panicking_task_ends_the_agent_with_its_panic() {
        let mut tasks = Tasks::default();
        tasks.spawn("source", forever());
        tasks.spawn("sync", async { panic!("slot {} of 0", 1) });
        let ended = tasks.first_ended().await;
        assert!(matches!(ended, TaskEnded::Panicked { task: "sync", .. }), "{ended:?}");
        let text = ended.to_string();
        assert_eq!(text, "the sync task panicked: slot 1 of 0");
    }

    #[tokio::test]
    async fn a_task_that_returns_ends_the_agent() {
        let mut tasks = Tasks::default();
        tasks.spawn("interfaces", forever());
        tasks.spawn("sync", async { Ok(()) });
        let ended = tasks.first_ended().await;
        assert!(matches!(ended, TaskEnded::Returned { task: "sync" }), "{ended:?}");
    }

    #[tokio::test]
    async fn a_failing_task_ends_the_agent_with_its_error() {
        let mut tasks = Tasks::default();
        tasks.spawn("sync", forever());
        tasks.spawn("source", async { Err("reading /etc/manifests: No such file or directory".into()) });
        let ended = tasks.first_ended().await;
        assert_eq!(ended.to_string(), "the source task failed");
        let cause = ended.source().map(ToString::to_string);
        assert_eq!(cause.as_deref(), Some("reading /etc/manifests: No such file or directory"));
    }

    #[test]
    fn panic_messages_of_both_payload_kinds() {
        assert_eq!(panic_message(&"literal"), "literal");
        assert_eq!(panic_message(&format!("formatted {}", 1)), "formatted 1");
        assert_eq!(panic_message(&7_u8), "(a panic without a message)");
    }
}
