//! `GrpcFrontDoor`: the gRPC server on the control socket (and the TCP address, when configured).
//!
//! Serves `agent.v1.VPNAgentService` ([`crate::grpc::VpnAgent`]), `agent.v1.AgentService`
//! ([`crate::agent_service::AgentApi`]: its `HealthCheck`), `grpc.health.v1.Health` and server
//! reflection (v1 and v1alpha, advertising only the services served here) behind the
//! [`crate::grpc_edge::Edge`] (peer check, read and request timeouts, the global concurrency gate,
//! request counting), on the shared [`crate::serve`] shell (connection cap, idle timeout, HTTP/2
//! stream and keepalive limits, drain on stop).
//!
//! Health reports `SERVING` while the agent is ready ([`crate::health`]) and `NOT_SERVING`
//! otherwise, re-checked every [`HEALTH_POLL`].
//!
//! The listeners are bound once at start-up (`app::start`); a restarted front door accepts on the
//! same sockets and the connections already accepted go on. When a serving task ends the actor
//! fails and is restarted.

use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorProcessingErr, ActorRef};
use tonic::service::Routes;
use tonic_health::server::HealthReporter;

use crate::actors::{serve_on, Context, Serves, ServingState};
use crate::agent_service::AgentApi;
use crate::grpc::VpnAgent;
use crate::grpc_edge::Edge;
use crate::messages::ServerMsg;
use crate::proto::agent::v1::agent_service_server::AgentServiceServer;
use crate::proto::agent::v1::vpn_agent_service_server::VpnAgentServiceServer;
use crate::serve::{Http, Protocol};

pub struct GrpcFrontDoor;

/// How often the health service's status follows readiness.
pub const HEALTH_POLL: Duration = Duration::from_millis(250);

/// The services this front door serves, as advertised by reflection (the agent's service first:
/// its health status follows readiness).
pub const SERVED: [&str; 5] = [
    "agent.v1.VPNAgentService",
    "agent.v1.AgentService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

async fn follow_readiness(ctx: Arc<Context>, reporter: HealthReporter) {
    use tonic_health::ServingStatus;
    let mut last = None;
    loop {
        let now = if ctx.health.check().is_ok() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(now) {
            reporter.set_service_status("", now).await;
            reporter.set_service_status(SERVED[0], now).await;
            last = Some(now);
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

fn routes(ctx: &Arc<Context>) -> Result<(Routes, HealthReporter), ActorProcessingErr> {
    let cfg = ctx.config();
    let (reporter, health_service) = tonic_health::server::health_reporter();
    let mut v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    let mut v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
    for name in SERVED {
        v1 = v1.with_service_name(name);
        v1alpha = v1alpha.with_service_name(name);
    }
    let agent = VpnAgent::new(ctx.clone(), cfg.supervisor.call_timeout);
    let routes = Routes::new(health_service)
        .add_service(v1.build_v1()?)
        .add_service(v1alpha.build_v1alpha()?)
        .add_service(VpnAgentServiceServer::new(agent))
        .add_service(AgentServiceServer::new(AgentApi::new(ctx.clone())))
        .prepare();
    Ok((routes, reporter))
}

impl Serves for GrpcFrontDoor {
    const NAME: &'static str = super::GRPC_FRONT_DOOR;

    fn start(
        myself: &ActorRef<ServerMsg>,
        ctx: &Arc<Context>,
    ) -> Result<ServingState, ActorProcessingErr> {
        let (routes, reporter) = routes(ctx)?;
        let follower = Box::pin(follow_readiness(ctx.clone(), reporter));
        let g = &ctx.config().grpc;
        let http = Http {
            service: Edge::new(routes, ctx.clone()),
            protocol: Protocol::Http2 {
                max_streams: g.max_streams_per_connection,
                keepalive_interval: g.keepalive_interval,
                keepalive_timeout: g.keepalive_timeout,
            },
        };
        Ok(serve_on(
            myself,
            ctx,
            ctx.grpc_endpoints.clone(),
            http,
            vec![("health_status", follower)],
        ))
    }
}
