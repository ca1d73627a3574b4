//! `GrpcFrontDoor`: the tonic server on the gRPC listener.
//!
//! Serves `agent.v1.VPNAgentService` ([`crate::grpc::VpnAgent`]), `grpc.health.v1.Health` and
//! server reflection (v1) from the descriptor set built into the binary. Requests in flight
//! (across all connections) and request duration are bounded from `[grpc]`. The configuration
//! check refuses a plaintext bind on anything but loopback; mTLS arrives with a later release.
//!
//! The listener is bound once at start-up (`app::start`) and shared, so a restarted front door
//! accepts on the same socket; the server task lives in the actor's state and is aborted with it
//! (connections already accepted finish on their own tasks).

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tower::limit::GlobalConcurrencyLimitLayer;

use crate::actors::{accept_on, Context, ServingState};
use crate::grpc::VpnAgent;
use crate::messages::ServerMsg;
use crate::proto::agent::v1::vpn_agent_service_server::VpnAgentServiceServer;

pub struct GrpcFrontDoor;

impl Actor for GrpcFrontDoor {
    type Msg = ServerMsg;
    type State = ServingState;
    type Arguments = Arc<Context>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        ctx: Arc<Context>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let cfg = &ctx.config;
        let Some(listener) = &ctx.grpc_listener else {
            // The Unix socket listener (`grpc.socket`) is not served by this version yet.
            tracing::warn!("grpc.listen is not set: no gRPC listener");
            return Ok(ServingState::new(
                tokio::spawn(std::future::pending::<()>()),
            ));
        };
        // Small replies must not wait on the client's delayed ACK (measured: 40 ms per call).
        let incoming = TcpIncoming::from(accept_on(listener)?).with_nodelay(Some(true));

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<VpnAgentServiceServer<VpnAgent>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let agent = VpnAgent::new(
            ctx.metrics.clone(),
            cfg.supervisor.call_timeout,
            cfg.ocserv.request_timeout,
        );
        // One limit across all connections: requests beyond it wait for a slot, so the work the
        // agent takes on is bounded at its edge whatever the number of clients.
        let router = Server::builder()
            .timeout(cfg.grpc.request_timeout)
            .layer(GlobalConcurrencyLimitLayer::new(
                cfg.grpc.max_concurrent_requests,
            ))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(VpnAgentServiceServer::new(agent));
        let server = tokio::spawn(async move {
            if let Err(e) = router.serve_with_incoming(incoming).await {
                tracing::error!(error = %e, "gRPC server stopped");
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
            ServerMsg::Crash => panic!("chaos: crash requested for {}", super::GRPC_FRONT_DOOR),
        }
    }
}
