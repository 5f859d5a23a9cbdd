//! The node agent's end of the CNI socket: one request per connection, answered from the
//! [`PodNetnsRegistry`]. An ADD registers the pod's netns and holds the connection until the
//! reconcile loop gives a verdict (bounded), so the runtime starts the app only once its traffic
//! is captured.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::protocol::{MAX_MESSAGE, Op, Outcome, PROTOCOL_VERSION, PodAdd, Request, Response};
use super::registry::{Enrollment, PodNetns, PodNetnsRegistry, Source};

/// Default socket path, in the host's view and the agent's (the DaemonSet mounts the directory
/// at the same path).
pub const DEFAULT_SOCKET: &str = crate::config::DEFAULT_CNI_SOCKET;
/// How long an ADD waits for a verdict when the plugin does not say.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);
/// Upper bound on any ADD's wait, whatever the plugin asks for.
pub const MAX_WAIT: Duration = Duration::from_secs(120);
/// Connections served at once; more wait in the listen backlog. A node starts at most a few
/// hundred pods at a time.
pub const MAX_CONNECTIONS: usize = 512;
/// Time a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds the CNI socket at `path`: creates the directory, replaces a stale socket left by a
/// previous agent, and restricts the socket to root (whoever can write to it can make the agent
/// adopt any network namespace).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; remove it or choose another CNI socket path", path.display()),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves CNI plugin requests on `listener` until `shutdown` resolves. In-flight requests are
/// dropped then: a waiting plugin sees the connection close and fails its ADD, which the runtime
/// retries.
pub async fn serve(listener: UnixListener, registry: Arc<PodNetnsRegistry>, shutdown: impl Future<Output = ()> + Send) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = accept_within_limit(&listener, &limit) => match accepted {
                Ok((stream, permit)) => {
                    let registry = registry.clone();
                    tasks.spawn(async move {
                        handle(stream, &registry).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "CNI socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tasks.abort_all();
    tracing::debug!("CNI socket server stopped");
}

/// Waits for a free connection slot, then for a connection. Cancel-safe: a slot taken while no
/// connection came is given back.
async fn accept_within_limit(
    listener: &UnixListener,
    limit: &Arc<Semaphore>,
) -> io::Result<(UnixStream, OwnedSemaphorePermit)> {
    let permit = limit.clone().acquire_owned().await.expect("the semaphore is never closed");
    let (stream, _) = listener.accept().await?;
    Ok((stream, permit))
}

async fn handle(stream: UnixStream, registry: &PodNetnsRegistry) {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_MESSAGE as u64 + 1);
    let outcome = match tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => Outcome::Error { message: format!("no request within {READ_TIMEOUT:?}") },
        Ok(Err(e)) => Outcome::Error { message: format!("reading the request: {e}") },
        Ok(Ok(_)) if line.len() > MAX_MESSAGE => {
            Outcome::Error { message: format!("request over {MAX_MESSAGE} bytes") }
        }
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Ok(req) if req.v != PROTOCOL_VERSION => Outcome::Error {
                message: format!(
                    "weft-cni speaks protocol v{} and this agent v{PROTOCOL_VERSION}: finish rolling out the weft DaemonSet (it reinstalls the plugin)",
                    req.v
                ),
            },
            Ok(req) => answer(req.op, registry).await,
            Err(e) => Outcome::Error { message: format!("malformed request: {e}") },
        },
    };
    if let Outcome::Error { message } = &outcome {
        tracing::warn!(error = %message, "CNI request failed");
    }
    let mut text = serde_json::to_vec(&Response::new(outcome)).expect("responses serialise");
    text.push(b'\n');
    if let Err(e) = write.write_all(&text).await {
        // The plugin gave up (its own deadline); it already reported the failure.
        tracing::debug!(error = %e, "CNI client went away before the answer");
    }
}

async fn answer(op: Op, registry: &PodNetnsRegistry) -> Outcome {
    match op {
        Op::Add(add) => add_pod(add, registry).await,
        Op::Del(del) => {
            if registry.remove(&del.pod.namespace, &del.pod.name, Some(&del.container_id)) {
                tracing::info!(pod = %del.pod, container_id = %del.container_id, "CNI DEL: pod left this node");
            }
            Outcome::Ok
        }
        Op::Check(check) => match registry.entry(&check.pod.namespace, &check.pod.name) {
            None => Outcome::Unknown,
            Some(e) => match e.enrollment {
                Enrollment::Enrolled => Outcome::Enrolled,
                Enrollment::NotCaptured => Outcome::NotCaptured,
                Enrollment::Pending => Outcome::Pending,
            },
        },
        Op::Gc { valid_container_ids } => {
            let removed = registry.retain_sandboxes(&valid_container_ids);
            if removed > 0 {
                tracing::info!(removed, "CNI GC: forgot pods whose sandbox is gone");
            }
            Outcome::Ok
        }
        Op::Status => Outcome::Ok,
    }
}

async fn add_pod(add: PodAdd, registry: &PodNetnsRegistry) -> Outcome {
    if add.pod.namespace.is_empty() || add.pod.name.is_empty() || !add.netns.is_absolute() {
        return Outcome::Error {
            message: format!("ADD needs a pod namespace, name and an absolute netns path, got {add:?}"),
        };
    }
    // Answer a little before the plugin stops listening, so it reports our reason, not its own.
    let wait = match add.wait_ms {
        0 => DEFAULT_WAIT,
        ms => Duration::from_millis(ms).saturating_sub(Duration::from_millis(ms / 10).min(Duration::from_secs(1))),
    }
    .min(MAX_WAIT);
    let pod = add.pod.clone();
    tracing::info!(%pod, netns = %add.netns.display(), container_id = %add.container_id, ips = ?add.ips, "CNI ADD");
    registry.register(
        pod.clone(),
        PodNetns {
            netns: add.netns,
            uid: add.uid,
            container_id: Some(add.container_id),
            ips: add.ips,
            source: Source::Cni,
        },
    );
    match registry.wait_verdict(&pod, wait).await {
        Some(Enrollment::Enrolled) => Outcome::Enrolled,
        Some(Enrollment::NotCaptured) => Outcome::NotCaptured,
        Some(Enrollment::Pending) => unreachable!("wait_verdict returns decided verdicts only"),
        None if registry.entry(&pod.namespace, &pod.name).is_none() => {
            Outcome::Error { message: format!("pod {pod} was deleted while waiting for enrollment") }
        }
        None => Outcome::Error {
            message: format!(
                "pod {pod} not enrolled within {wait:?}: the agent has not seen it in the API yet or cannot set up its \
                 listeners; see the weft node agent's log on this node"
            ),
        },
    }
}
