//! HBONE framing: HTTP/2 `CONNECT` tunnels over an already-authenticated stream (mutual TLS in
//! production, any byte stream in tests), wire-compatible with Istio ambient.
//!
//! A tunnel is one HTTP/2 stream: the client sends `CONNECT` with `:authority = ip:port` of the
//! destination workload, the server answers `200` and both sides then copy bytes, ending their
//! half with END_STREAM (TCP half-close maps to it both ways). This module owns the HTTP/2
//! settings and the copy loop; it knows nothing about TLS, identities or policy.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Per-stream receive window. Sized so one stream can keep a fast link busy across the
/// round trip (measured: smaller windows cap single-stream throughput; see `bench l4`).
pub const STREAM_WINDOW: u32 = 4 << 20;
/// Per-connection receive window: room for several streams at full speed.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Largest HTTP/2 frame we accept: fewer, larger DATA frames cost less framing work.
pub const MAX_FRAME: u32 = 1 << 20;
/// How many tunnels may share one HBONE connection.
pub const MAX_STREAMS: u32 = 1000;
/// Largest read from the plaintext side; each read becomes (at most) one DATA frame. Bulk
/// transfers grow to this; request/response traffic stays at `FIRST_READ`.
const READ_CHUNK: usize = 256 << 10;
/// First read buffer of a tunnel: most connections are small, so they should not pay for
/// (or keep resident) a bulk-sized buffer.
const FIRST_READ: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    #[error("HBONE CONNECT to {authority} answered {status}")]
    Status { authority: String, status: http::StatusCode },
    #[error("io: {0}")]
    Io(#[from] io::Error),
}

pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .enable_push(false);
    b
}

pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS);
    b
}

/// Sends `CONNECT authority` on an HBONE connection and waits for the `200`.
pub async fn connect(
    sender: h2::client::SendRequest<Bytes>,
    authority: SocketAddr,
    headers: &[(&'static str, String)],
) -> Result<(SendStream<Bytes>, RecvStream), Error> {
    let mut req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority.to_string())
        .version(http::Version::HTTP_2);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req.body(()).expect("CONNECT request parts are valid");
    let mut sender = sender.ready().await?;
    let (response, send) = sender.send_request(req, false)?;
    let response = response.await?;
    if response.status() != http::StatusCode::OK {
        return Err(Error::Status { authority: authority.to_string(), status: response.status() });
    }
    Ok((send, response.into_body()))
}

/// Byte counts of a finished tunnel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    /// plaintext side → tunnel
    pub to_tunnel: u64,
    /// tunnel → plaintext side
    pub from_tunnel: u64,
}

/// Copies between a plaintext stream and a tunnel until both directions have ended. Half-close
/// travels both ways: EOF on `plain` ends our stream half, END_STREAM from the peer shuts down
/// `plain`'s write side. An error on either side resets the stream and ends both.
pub async fn copy<S>(plain: S, mut send: SendStream<Bytes>, recv: RecvStream) -> (Copied, Result<(), Error>)
where
    S: AsyncRead + AsyncWrite,
{
    let (mut r, mut w) = tokio::io::split(plain);
    let mut to_tunnel = 0u64;
    let mut from_tunnel = 0u64;
    let result = {
        let up = plain_to_tunnel(&mut r, &mut send, &mut to_tunnel);
        let down = tunnel_to_plain(recv, &mut w, &mut from_tunnel);
        tokio::pin!(up, down);
        // The first error ends the tunnel; a clean finish waits for the other direction.
        tokio::select! {
            res = &mut up => match res {
                Ok(()) => down.await,
                Err(e) => Err(e),
            },
            res = &mut down => match res {
                Ok(()) => up.await,
                Err(e) => Err(e),
            },
        }
    };
    if result.is_err() {
        send.send_reset(h2::Reason::CANCEL);
    }
    (Copied { to_tunnel, from_tunnel }, result)
}

async fn plain_to_tunnel<R: AsyncRead + Unpin>(
    r: &mut R,
    send: &mut SendStream<Bytes>,
    count: &mut u64,
) -> Result<(), Error> {
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    let mut chunk = FIRST_READ;
    loop {
        // Frozen chunks are freed once h2 has written them; `reserve` then reuses the block
        // instead of allocating, so a long transfer allocates a handful of buffers in total.
        if buf.capacity() < chunk / 4 {
            buf.reserve(chunk);
        }
        let room = buf.capacity();
        let n = r.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true)?;
            return Ok(());
        }
        // A read that filled the buffer means a bulk sender: read more at a time from now on
        // (the larger block is reserved at the top of the loop, after this data is split off).
        if n == room {
            chunk = (chunk * 2).min(READ_CHUNK);
        }
        *count += n as u64;
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            send.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(granted) => granted?,
                None => return Err(Error::Io(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel closed by peer"))),
            };
            if granted == 0 {
                continue;
            }
            send.send_data(data.split_to(granted.min(data.len())), false)?;
        }
    }
}

async fn tunnel_to_plain<W: AsyncWrite + Unpin>(mut recv: RecvStream, w: &mut W, count: &mut u64) -> Result<(), Error> {
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let n = chunk.len();
        w.write_all(&chunk).await?;
        *count += n as u64;
        // Give the window back only once the bytes are out: a slow reader pushes back.
        recv.flow_control().release_capacity(n)?;
    }
    // END_STREAM: the peer is done sending; pass the half-close on.
    w.shutdown().await?;
    Ok(())
}

/// Largest write handed to h2 at once: bounds the copy each `poll_write` makes.
const MAX_WRITE: usize = 64 << 10;

/// One HBONE tunnel (an h2 stream pair) as a byte stream, so HTTP can be served or spoken inside it
/// (the waypoint runs hyper over it). Received bytes give their flow-control window back as they are
/// read (a slow reader pushes back); `shutdown` sends END_STREAM; dropping it before both halves
/// ended resets the stream (`CANCEL`), as a dropped TCP socket would.
pub struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not read yet (their window is released only once read).
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
}

impl H2Io {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Io { send, recv, pending: Bytes::new(), read_eof: false, write_closed: false }
    }
}

impl std::fmt::Debug for H2Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Io")
            .field("pending", &self.pending.len())
            .field("read_eof", &self.read_eof)
            .field("write_closed", &self.write_closed)
            .finish()
    }
}

fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = match e.reason() {
        Some(h2::Reason::CANCEL | h2::Reason::STREAM_CLOSED) => io::ErrorKind::ConnectionReset,
        Some(h2::Reason::REFUSED_STREAM) => io::ErrorKind::ConnectionRefused,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = &mut *self;
        while this.pending.is_empty() {
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            match std::task::ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => this.read_eof = true,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending.split_to(n));
        if let Err(e) = this.recv.flow_control().release_capacity(n) {
            return Poll::Ready(Err(h2_to_io(e)));
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown")));
        }
        let want = buf.len().min(MAX_WRITE);
        // Bounded: each round either writes or waits for h2 to grant capacity.
        for _ in 0..4 {
            let cap = self.send.capacity();
            if cap > 0 {
                let n = cap.min(want);
                return Poll::Ready(
                    self.send.send_data(Bytes::copy_from_slice(&buf[..n]), false).map(|()| n).map_err(h2_to_io),
                );
            }
            self.send.reserve_capacity(want);
            match std::task::ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "tunnel closed by peer"))),
            }
        }
        // h2 kept granting nothing: try again on the next poll rather than spin here.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, _: &mut std::task::Context<'_>) -> std::task::Poll<io::Result<()>> {
        // h2 writes frames as soon as its connection task runs; there is nothing buffered here.
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.send.send_data(Bytes::new(), true).map_err(h2_to_io)?;
        }
        std::task::Poll::Ready(Ok(()))
    }
}

impl Drop for H2Io {
    fn drop(&mut self) {
        // An unfinished tunnel must not look like a clean end to the peer.
        if !self.write_closed || !self.read_eof {
            self.send.send_reset(h2::Reason::CANCEL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    /// A client and a server connected over an in-memory pipe; the server answers each CONNECT
    /// with `status` and echoes the tunnel's bytes back, reporting the authorities it saw.
    async fn pair(status: u16) -> (h2::client::SendRequest<Bytes>, tokio::sync::mpsc::Receiver<String>) {
        let (c, s) = duplex(1 << 20);
        // Room for every CONNECT of a test: a full channel would stop the server polling its connection.
        let (seen_tx, seen_rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let mut conn = server_builder().handshake::<_, Bytes>(s).await.unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                assert_eq!(req.method(), http::Method::CONNECT);
                seen_tx.send(req.uri().to_string()).await.unwrap();
                let resp = http::Response::builder().status(status).body(()).unwrap();
                let send = respond.send_response(resp, status != 200).unwrap();
                if status == 200 {
                    let (a, b) = duplex(1 << 16);
                    tokio::spawn(async move {
                        let (mut r, mut w) = tokio::io::split(b);
                        tokio::io::copy(&mut r, &mut w).await.unwrap();
                        w.shutdown().await.unwrap();
                    });
                    tokio::spawn(copy(a, send, req.into_body()));
                }
            }
        });
        let (sender, conn) = client_builder().handshake(c).await.unwrap();
        tokio::spawn(conn);
        (sender, seen_rx)
    }

    #[tokio::test]
    async fn connect_carries_authority_and_echoes_with_half_close() {
        let (sender, mut seen) = pair(200).await;
        let target: SocketAddr = "10.0.0.7:8080".parse().unwrap();
        let (send, recv) = connect(sender, target, &[]).await.unwrap();
        assert_eq!(seen.recv().await.unwrap(), "10.0.0.7:8080");
        let (app, mut peer) = duplex(1 << 16);
        let task = tokio::spawn(copy(app, send, recv));
        // 3 MiB crosses several windows and frames.
        let payload: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
        let (mut pr, mut pw) = tokio::io::split(&mut peer);
        let writer = async {
            pw.write_all(&payload).await.unwrap();
            pw.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let reader = pr.read_to_end(&mut got);
        let ((), n) = tokio::join!(writer, reader);
        assert_eq!(n.unwrap(), payload.len());
        assert!(got == payload, "echo differs");
        let (copied, res) = task.await.unwrap();
        res.unwrap();
        assert_eq!(copied, Copied { to_tunnel: payload.len() as u64, from_tunnel: payload.len() as u64 });
    }

    #[tokio::test]
    async fn refused_connect_reports_status() {
        let (sender, _seen) = pair(401).await;
        let err = connect(sender, "10.0.0.7:8080".parse().unwrap(), &[]).await.unwrap_err();
        assert!(matches!(err, Error::Status { status, .. } if status == 401), "{err}");
    }

    #[tokio::test]
    async fn many_streams_share_one_connection() {
        let (sender, mut seen) = pair(200).await;
        let mut tasks = Vec::new();
        for i in 0..20u16 {
            let sender = sender.clone();
            tasks.push(tokio::spawn(async move {
                let (send, recv) = connect(sender, SocketAddr::from(([10, 0, 0, 1], 1000 + i)), &[]).await.unwrap();
                let (app, mut peer) = duplex(1 << 12);
                let t = tokio::spawn(copy(app, send, recv));
                let msg = format!("stream {i}");
                peer.write_all(msg.as_bytes()).await.unwrap();
                peer.shutdown().await.unwrap();
                let mut back = String::new();
                peer.read_to_string(&mut back).await.unwrap();
                assert_eq!(back, msg);
                t.await.unwrap().1.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut n = 0;
        while seen.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 20);
    }

    /// A server whose CONNECT streams are `H2Io`s handed to `serve`.
    async fn h2io_pair<F, Fut>(serve: F) -> h2::client::SendRequest<Bytes>
    where
        F: Fn(H2Io) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (c, s) = duplex(1 << 20);
        tokio::spawn(async move {
            let mut conn = server_builder().handshake::<_, Bytes>(s).await.unwrap();
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let send = respond.send_response(http::Response::new(()), false).unwrap();
                tokio::spawn(serve(H2Io::new(send, req.into_body())));
            }
        });
        let (sender, conn) = client_builder().handshake(c).await.unwrap();
        tokio::spawn(conn);
        sender
    }

    #[tokio::test]
    async fn h2io_echoes_beyond_the_window_with_half_close() {
        let sender = h2io_pair(|io| async move {
            let (mut r, mut w) = tokio::io::split(io);
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        })
        .await;
        let (send, recv) = connect(sender, "10.0.0.7:80".parse().unwrap(), &[]).await.unwrap();
        let io = H2Io::new(send, recv);
        // 9 MiB: more than the stream window (4 MiB), so the echo only finishes if reads release it.
        let payload: Vec<u8> = (0..9u32 << 20).map(|i| (i * 13 % 251) as u8).collect();
        let (mut r, mut w) = tokio::io::split(io);
        let writer = async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let reader = r.read_to_end(&mut got);
        let ((), n) = tokio::time::timeout(std::time::Duration::from_secs(20), async { tokio::join!(writer, reader) })
            .await
            .expect("echo finished");
        assert_eq!(n.unwrap(), payload.len());
        assert!(got == payload, "echo differs");
    }

    #[tokio::test]
    async fn h2io_carries_http1_both_ways() {
        use http_body_util::{BodyExt, Full};
        let sender = h2io_pair(|io| async move {
            let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let body = req.into_body().collect().await?.to_bytes();
                Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from([b"got ", &body[..]].concat()))))
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(io), svc)
                .await
                .unwrap();
        })
        .await;
        let (send, recv) = connect(sender, "10.0.0.7:80".parse().unwrap(), &[]).await.unwrap();
        let (mut client, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(H2Io::new(send, recv))).await.unwrap();
        tokio::spawn(conn);
        for i in 0..3 {
            let req =
                http::Request::post("/").header("host", "x").body(Full::new(Bytes::from(format!("n{i}")))).unwrap();
            let resp = client.send_request(req).await.unwrap();
            assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), format!("got n{i}").as_bytes());
        }
    }

    #[tokio::test]
    async fn h2io_dropped_unfinished_resets_the_stream() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        let sender = h2io_pair(move |mut io| {
            let tx = tx.lock().unwrap().take().unwrap();
            async move {
                let mut buf = Vec::new();
                let _ = tx.send(io.read_to_end(&mut buf).await.map_err(|e| e.kind()));
            }
        })
        .await;
        let (send, recv) = connect(sender, "10.0.0.7:80".parse().unwrap(), &[]).await.unwrap();
        let mut io = H2Io::new(send, recv);
        io.write_all(b"partial").await.unwrap();
        drop(io);
        let res = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await.unwrap().unwrap();
        assert_eq!(res, Err(io::ErrorKind::ConnectionReset), "a dropped tunnel must not read as a clean EOF");
    }
}
