//! The HTTP side of `--metrics`: `GET /metrics` answers the registry in the OpenMetrics text
//! format (which Prometheus reads); nothing else is served. No timers: between scrapes the
//! server sleeps in accept and read.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use log::{debug, info, warn};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::{Board, exposition::FileMetrics};

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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
    let registry = Arc::new(registry(board));
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
            let registry = Arc::clone(&registry);
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(request, Arc::clone(&registry)));
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

/// Every series the board's files and the daemon have.
pub fn registry(board: Arc<Board>) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "filemapd_update_seconds",
        "How long each pass over a file took (FIEMAP read, plan, dm messages)",
        board.update_seconds.clone(),
    );
    registry.register_collector(Box::new(FileMetrics(board)));
    registry
}

/// What a scrape answers: the registry read now, in the text format.
pub fn scrape(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).map(|()| text)
}

async fn answer<B>(
    request: Request<B>,
    registry: Arc<Registry>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        Ok(response)
    };
    if request.uri().path() != "/metrics" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "see /metrics\n".into());
    }
    // Reading counters is one dm ioctl per region: off the thread the monitors run on.
    let encoded = tokio::task::spawn_blocking(move || scrape(&registry)).await;
    match encoded {
        Ok(Ok(text)) => reply(StatusCode::OK, CONTENT_TYPE, text),
        _ => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "encoding the metrics failed\n".into(),
        ),
    }
}
