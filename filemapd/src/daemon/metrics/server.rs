//! The HTTP side of `--metrics`: `GET /metrics` answers the endpoint in the OpenMetrics text
//! format (which Prometheus reads); nothing else is served. No timers: between scrapes the
//! server sleeps in accept and read. An answer is sent in pieces as it is written (10,000
//! files make ~27 MB of text): the daemon never holds it whole, and the allocator gives every
//! piece the same memory back instead of fresh pages for one growing string.
use std::{
    convert::Infallible,
    fmt,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use anyhow::Context as _;
use http_body::{Body, Frame};
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use log::{debug, info, warn};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::mpsc};

use super::{Board, exposition};

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How much of an answer is written before it is handed on: under glibc's threshold for
/// giving memory its own mapping (128 KiB), so that a piece reuses a freed one's memory.
const PIECE_BYTES: usize = 64 << 10;

/// A piece to write into: room for [`PIECE_BYTES`] and a line more (4 KiB, more than any
/// sample's line), so that the write that fills a piece does not make it grow.
fn empty_piece() -> String {
    String::with_capacity(PIECE_BYTES + 4096)
}

/// Binds `address` now (so that a taken port fails the start) and returns the task that
/// serves the board's metrics until the watch ends.
pub async fn serve(
    address: SocketAddr,
    board: Arc<Board>,
) -> anyhow::Result<impl Future<Output = ()>> {
    let listener = TcpListener::bind(address)
        .await
        .with_context(|| format!("--metrics: cannot listen on {address}"))?;
    info!("metrics on http://{address}/metrics");
    let endpoint = Arc::new(endpoint(board));
    Ok(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors (EMFILE) the listener stays readable: retrying at
                    // once would spin. Pause, and let a file's end or a reply free one.
                    warn!("metrics: accepting a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let endpoint = Arc::clone(&endpoint);
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(request, Arc::clone(&endpoint)));
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!("metrics: connection ended: {e}");
                }
            });
        }
    })
}

/// What a scrape reads: the daemon-wide series (in prometheus-client's registry) and the
/// board's files.
pub struct Endpoint {
    registry: Registry,
    board: Arc<Board>,
}

/// The endpoint of the board's files and the daemon.
pub fn endpoint(board: Arc<Board>) -> Endpoint {
    let mut registry = Registry::default();
    registry.register(
        "filemapd_update_seconds",
        "How long each pass over a file took (FIEMAP read, plan, dm messages)",
        board.update_seconds.clone(),
    );
    Endpoint { registry, board }
}

/// Writes the endpoint's answer, read now, in the text format, handing each piece of about
/// [`PIECE_BYTES`] to `send` as it is full; `send` returns false when the answer is no
/// longer wanted (the scraper went), which ends the writing.
pub fn scrape(endpoint: &Endpoint, send: impl FnMut(Bytes) -> bool) -> fmt::Result {
    use prometheus_client::encoding::text;
    let mut pieces = Pieces {
        piece: String::new(),
        send,
    };
    text::encode_registry(&mut pieces, &endpoint.registry)?;
    exposition::write_files(&endpoint.board, &mut pieces)?;
    text::encode_eof(&mut pieces)?;
    pieces.hand_on()
}

/// A [`fmt::Write`] that hands its text on in pieces. A piece's memory is taken when its
/// first text comes, so that none is taken after the last.
struct Pieces<F: FnMut(Bytes) -> bool> {
    piece: String,
    send: F,
}

impl<F: FnMut(Bytes) -> bool> Pieces<F> {
    fn hand_on(&mut self) -> fmt::Result {
        if self.piece.is_empty() {
            return Ok(());
        }
        if (self.send)(Bytes::from(std::mem::take(&mut self.piece))) {
            Ok(())
        } else {
            Err(fmt::Error)
        }
    }
}

impl<F: FnMut(Bytes) -> bool> fmt::Write for Pieces<F> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.piece.capacity() == 0 {
            self.piece = empty_piece();
        }
        self.piece.push_str(s);
        if self.piece.len() >= PIECE_BYTES {
            self.hand_on()?;
        }
        Ok(())
    }
}

/// An answer's body: the pieces as the scrape writes them. An error (the writing failed
/// midway) ends the connection without the chunked body's end, so that the scraper cannot
/// take a cut answer for a whole one.
struct Answer(mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl Answer {
    /// A short fixed answer.
    fn text(text: &'static str) -> Self {
        let (sender, receiver) = mpsc::channel(1);
        let _ = sender.try_send(Ok(Bytes::from_static(text.as_bytes())));
        Self(receiver)
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|piece| piece.map(|piece| piece.map(Frame::data)))
    }
}

async fn answer<B>(
    request: Request<B>,
    endpoint: Arc<Endpoint>,
) -> Result<Response<Answer>, Infallible> {
    if request.uri().path() != "/metrics" {
        return Ok(response(
            StatusCode::NOT_FOUND,
            "text/plain",
            Answer::text("see /metrics\n"),
        ));
    }
    // A few pieces in flight: the writing runs ahead of the socket by at most these.
    let (sender, receiver) = mpsc::channel(4);
    let failed = sender.clone();
    // Reading counters may be one dm ioctl per region: off the thread the monitors run on.
    let writing = tokio::task::spawn_blocking(move || {
        scrape(&endpoint, |piece| sender.blocking_send(Ok(piece)).is_ok())
    });
    tokio::spawn(async move {
        let why = match writing.await {
            Ok(Ok(())) => return,
            Ok(Err(fmt::Error)) => "encoding the metrics failed".to_string(),
            Err(e) => format!("encoding the metrics failed: {e}"),
        };
        // Also when the scraper went: then nobody reads it.
        debug!("metrics: {why}");
        let _ = failed.send(Err(std::io::Error::other(why))).await;
    });
    Ok(response(StatusCode::OK, CONTENT_TYPE, Answer(receiver)))
}

fn response(status: StatusCode, content_type: &str, body: Answer) -> Response<Answer> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    #[test]
    fn pieces_are_full_but_the_last_and_add_up_to_the_text() {
        let mut sent: Vec<Bytes> = Vec::new();
        let mut pieces = Pieces {
            piece: String::new(),
            send: |piece| {
                sent.push(piece);
                true
            },
        };
        let mut text = String::new();
        for i in 0..20_000 {
            let line = format!("filemapd_file_reads_total{{path=\"/images/vm{i}.img\"}} {i}\n");
            pieces.write_str(&line).unwrap();
            text.push_str(&line);
        }
        pieces.hand_on().unwrap();
        drop(pieces);
        assert!(sent.len() > 3, "{} pieces", sent.len());
        let (last, full) = sent.split_last().unwrap();
        assert!(full.iter().all(|p| p.len() >= PIECE_BYTES));
        assert!(!last.is_empty());
        assert_eq!(sent.concat(), text.as_bytes());
    }

    #[test]
    fn a_scraper_gone_ends_the_writing() {
        let mut handed = 0;
        let mut pieces = Pieces {
            piece: String::new(),
            send: |_| {
                handed += 1;
                false
            },
        };
        let long = "x".repeat(PIECE_BYTES);
        assert!(pieces.write_str("short").is_ok());
        assert!(pieces.write_str(&long).is_err());
        drop(pieces);
        assert_eq!(handed, 1);
    }

    #[tokio::test]
    async fn an_answer_is_the_whole_registry_in_the_text_format() {
        let endpoint = Arc::new(endpoint(Arc::new(Board::default())));
        let request = Request::get("/metrics").body(()).unwrap();
        let mut response = answer(request, Arc::clone(&endpoint)).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = Vec::new();
        while let Some(frame) =
            std::future::poll_fn(|cx| Pin::new(response.body_mut()).poll_frame(cx)).await
        {
            body.extend_from_slice(frame.unwrap().data_ref().unwrap());
        }
        let body = String::from_utf8(body).unwrap();
        assert!(
            body.contains("# TYPE filemapd_update_seconds histogram"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");

        let request = Request::get("/").body(()).unwrap();
        let response = answer(request, endpoint).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }

    /// HTTP/1.0 has no chunks: `filemapd top` and the tests read the answer to the
    /// connection's end.
    #[tokio::test]
    async fn an_http_1_0_scraper_reads_the_answer_to_its_end() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        tokio::spawn(serve(address, Arc::new(Board::default())).await.unwrap());
        let body = tokio::task::spawn_blocking(move || {
            crate::top::exposition::fetch(&address.to_string())
        })
        .await
        .unwrap()
        .unwrap();
        assert!(
            body.contains("# TYPE filemapd_update_seconds histogram"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
}
