//! `MetricsServer`: HTTP on the metrics listener (loopback unless `metrics.allow_non_loopback`).
//!
//! - `GET /metrics`: Prometheus text format from the shared registry (figures computed at scrape
//!   time, such as the session view's age, are refreshed first).
//! - `GET /healthz`: 200 while the process serves (liveness).
//! - `GET /readyz`: 200 while the agent is ready ([`crate::health`]), else 503 with the reason.
//!
//! Served on the shared [`crate::serve`] shell: `metrics.max_connections`, `metrics.idle_timeout`,
//! `metrics.header_timeout`. The listener is bound once at start-up (`app::start`); a restarted
//! `MetricsServer` accepts on the same socket. When its serving task ends the actor fails and is
//! restarted.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use ractor::{ActorProcessingErr, ActorRef};

use crate::actors::{serve_on, Context, Serves, ServingState};
use crate::messages::ServerMsg;
use crate::serve::{Http, Protocol};

pub struct MetricsServer;

async fn serve_metrics(State(ctx): State<Arc<Context>>) -> impl IntoResponse {
    ctx.metrics.refresh(&ctx.health);
    for ep in ctx.grpc_endpoints.iter().chain([&ctx.metrics_endpoint]) {
        ctx.metrics.set_connections_open(ep.label, ep.connections());
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ctx.metrics.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(ctx): State<Arc<Context>>) -> (StatusCode, String) {
    match ctx.health.check() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// The HTTP routes, separate from the actor so they can be tested without a socket.
pub fn router(ctx: Arc<Context>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(ctx)
}

impl Serves for MetricsServer {
    const NAME: &'static str = super::METRICS_SERVER;

    fn start(
        myself: &ActorRef<ServerMsg>,
        ctx: &Arc<Context>,
    ) -> Result<ServingState, ActorProcessingErr> {
        let http = Http {
            service: router(ctx.clone()),
            protocol: Protocol::Http1,
        };
        Ok(serve_on(
            myself,
            ctx,
            vec![ctx.metrics_endpoint.clone()],
            http,
            Vec::new(),
        ))
    }
}
