//! `MetricsServer`: HTTP on the metrics listener (loopback by default).
//!
//! - `GET /metrics`: Prometheus text format from the shared registry.
//! - `GET /healthz`: 200 while the process serves (liveness).
//! - `GET /readyz`: 200 once ocserv answered the agent's last request, else 503 with the reason.
//!
//! The listener is bound once at start-up (`app::start`); a restarted `MetricsServer` accepts on the same
//! socket. The server task lives in the actor's state and is aborted with it.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::actors::{accept_on, Context, ServingState};
use crate::messages::ServerMsg;
use crate::metrics::Metrics;

pub struct MetricsServer;

async fn serve_metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(m): State<Arc<Metrics>>) -> (StatusCode, &'static str) {
    if m.ocserv_is_up() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: ocserv did not answer the last request\n",
        )
    }
}

/// The HTTP routes, separate from the actor so they can be tested without a socket.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(metrics)
}

impl Actor for MetricsServer {
    type Msg = ServerMsg;
    type State = ServingState;
    type Arguments = Arc<Context>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        ctx: Arc<Context>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let listener = accept_on(&ctx.metrics_listener)?;
        let app = router(ctx.metrics.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
        Ok(ServingState::new(server))
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ServerMsg::Crash => panic!("chaos: crash requested for {}", super::METRICS_SERVER),
        }
    }
}
