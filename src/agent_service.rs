//! `agent.v1.AgentService`, served by the `GrpcFrontDoor` behind the same edge as the other
//! services (peer check, read and request timeouts, counting).
//!
//! `HealthCheck` answers the three tiers of `contract.md` §1 from state that outlives every
//! actor ([`crate::health::report`] is the rule): tier 1, every actor of the tree is running;
//! tier 2, ocserv is reachable (the readiness rule of `/readyz`); tier 3, the portal too (its
//! circuit breaker is closed). It never calls ocserv or the portal itself, so it answers at once
//! whatever they are doing. Another tier is `INVALID_ARGUMENT`.
//!
//! `AgentStream`, `ExecuteCommand`, `UpdateConfig` and `StreamLogs` are not served by this
//! version: they answer `UNIMPLEMENTED` (the README says so).

use std::sync::Arc;

use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use crate::actors::Context;
use crate::health::{self, PortalView, Tier};
use crate::proto::agent::v1 as pb;
use crate::proto::agent::v1::agent_service_server::AgentService;
use crate::tree::Child;

#[derive(Clone)]
pub struct AgentApi {
    ctx: Arc<Context>,
}

impl AgentApi {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    /// The health report for `tier`, from the live state of the tree, ocserv and the portal.
    pub fn health(&self, tier: Tier) -> health::Report {
        let missing: Vec<&str> = Child::ALL
            .into_iter()
            .map(Child::name)
            .filter(|name| ractor::registry::where_is(name).is_none())
            .collect();
        let portal = PortalView {
            configured: self.ctx.config().portal.endpoint.is_some(),
            breaker: self.ctx.portal.breaker_state(),
            last_call: self.ctx.portal.last_call(),
        };
        health::report(tier, &missing, self.ctx.health.check(), &portal)
    }
}

fn not_served(method: &str) -> Status {
    Status::unimplemented(format!(
        "agent.v1.AgentService/{method} is not served by this agent version"
    ))
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type AgentStreamStream = BoxStream<pb::ServerMessage>;
    type StreamLogsStream = BoxStream<pb::LogEntry>;

    async fn agent_stream(
        &self,
        _request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::AgentStreamStream>, Status> {
        Err(not_served("AgentStream"))
    }

    async fn execute_command(
        &self,
        _request: Request<pb::CommandRequest>,
    ) -> Result<Response<pb::CommandResponse>, Status> {
        Err(not_served("ExecuteCommand"))
    }

    async fn update_config(
        &self,
        _request: Request<pb::ConfigUpdateRequest>,
    ) -> Result<Response<pb::ConfigUpdateResponse>, Status> {
        Err(not_served("UpdateConfig"))
    }

    async fn stream_logs(
        &self,
        _request: Request<pb::LogStreamRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        Err(not_served("StreamLogs"))
    }

    async fn health_check(
        &self,
        request: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        let tier = Tier::from_request(request.get_ref().tier)
            .map_err(|why| Status::invalid_argument(format!("tier: {why}")))?;
        let report = self.health(tier);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Response::new(pb::HealthCheckResponse {
            healthy: report.healthy,
            status_message: report.message,
            checks: report.checks.into_iter().collect(),
            timestamp: Some(prost_types::Timestamp {
                seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
            }),
        }))
    }
}
