//! The gRPC services the agent serves, as plain tonic service types; the `GrpcFrontDoor` actor
//! binds them to the listener. Handlers validate every field first (`INVALID_ARGUMENT` naming the
//! field), then ask the actors by name with a bounded [`call`], and map failures to status codes:
//! unknown user → `NOT_FOUND`, ocserv unreachable → `UNAVAILABLE`. The legacy
//! `success`/`error_message` fields are filled too, for portals that read them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Request, Response, Status};

use crate::actors::{call, CallError, SESSION_REGISTRY};
use crate::messages::{CtlMsg, RegistryMsg, SessionsView};
use crate::metrics::Metrics;
use crate::ocserv::{counters, ByteCounters, CtlError, DisconnectOutcome, Session};
use crate::proto::agent::v1 as pb;
use crate::proto::agent::v1::vpn_agent_service_server::VpnAgentService;

/// `agent.v1.VPNAgentService`.
#[derive(Clone)]
pub struct VpnAgent {
    metrics: Arc<Metrics>,
    /// Bound of one cross-actor call.
    call_timeout: Duration,
    /// Bound of one call that waits on ocserv (actor hop plus ocserv's own timeout).
    ocserv_timeout: Duration,
}

impl VpnAgent {
    pub fn new(
        metrics: Arc<Metrics>,
        call_timeout: Duration,
        ocserv_request_timeout: Duration,
    ) -> Self {
        Self {
            metrics,
            call_timeout,
            ocserv_timeout: call_timeout + ocserv_request_timeout,
        }
    }

    fn finish<T>(&self, method: &'static str, r: Result<T, Status>) -> Result<Response<T>, Status> {
        let code = r.as_ref().map(|_| Code::Ok).unwrap_or_else(|s| s.code());
        self.metrics.grpc_request(method, code);
        r.map(Response::new)
    }

    async fn ctl<T: Send + 'static>(
        &self,
        idempotent: bool,
        build: impl Fn(ractor::RpcReplyPort<Result<T, CtlError>>) -> CtlMsg,
    ) -> Result<T, Status> {
        call(
            crate::actors::OCSERV_CTL,
            self.ocserv_timeout,
            idempotent,
            build,
        )
        .await
        .map_err(actor_status)?
        .map_err(ctl_status)
    }
}

fn actor_status(e: CallError) -> Status {
    Status::unavailable(e.to_string())
}

/// Maps an ocserv failure to a status code.
pub fn ctl_status(e: CtlError) -> Status {
    match &e {
        CtlError::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
        CtlError::Timeout { .. } => Status::deadline_exceeded(e.to_string()),
        CtlError::Protocol { .. } | CtlError::NoReply { .. } => Status::internal(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

fn timestamp(unix: u64) -> Option<prost_types::Timestamp> {
    (unix > 0).then(|| prost_types::Timestamp {
        seconds: i64::try_from(unix).unwrap_or(i64::MAX),
        nanos: 0,
    })
}

/// One registry session as the portal sees it. `session_id` is ocserv's ID; the 28-character
/// session id and other details go into `metadata` (kept small: a 10 000-session reply must fit
/// a default gRPC client's 4 MiB message limit; cipher suites are left to `occtl`).
pub fn vpn_session(s: &Session, counters: Option<ByteCounters>) -> pb::VpnSession {
    let mut metadata = HashMap::new();
    let mut put = |k: &str, v: String| {
        if !v.is_empty() {
            metadata.insert(k.to_string(), v);
        }
    };
    put("ocserv_session_id", s.safe_id.clone().unwrap_or_default());
    put("groupname", s.groupname.clone());
    put("device", s.device.clone());
    put("state", s.state.as_str().to_string());
    put("hostname", s.hostname.clone());
    put("user_agent", s.user_agent.clone());
    put("vhost", s.vhost.clone());
    put(
        "vpn_ipv6",
        s.vpn_ipv6.map(|a| a.to_string()).unwrap_or_default(),
    );
    let counters = counters.unwrap_or_default();
    pb::VpnSession {
        session_id: s.id.to_string(),
        username: s.username.clone(),
        client_ip: s.client_ip.map(|a| a.to_string()).unwrap_or_default(),
        vpn_ip: s.vpn_ip().map(|a| a.to_string()).unwrap_or_default(),
        connected_at: timestamp(s.connected_at),
        bytes_in: counters.bytes_in,
        bytes_out: counters.bytes_out,
        device_id: s.hostname.clone(),
        metadata,
    }
}

/// Which of a user's sessions a `DisconnectUser` takes: all of them, or only the newest (latest
/// connection time, then highest ID).
pub fn disconnect_targets(sessions: &[Session], all: bool) -> Vec<u32> {
    if all {
        return sessions.iter().map(|s| s.id).collect();
    }
    sessions
        .iter()
        .max_by_key(|s| (s.connected_at, s.id))
        .map(|s| vec![s.id])
        .unwrap_or_default()
}

#[tonic::async_trait]
impl VpnAgentService for VpnAgent {
    async fn notify_connect(
        &self,
        _request: Request<pb::NotifyConnectRequest>,
    ) -> Result<Response<pb::NotifyConnectResponse>, Status> {
        self.finish(
            "NotifyConnect",
            Err(Status::unimplemented(
                "NotifyConnect is not served by this agent version",
            )),
        )
    }

    async fn notify_disconnect(
        &self,
        _request: Request<pb::NotifyDisconnectRequest>,
    ) -> Result<Response<pb::NotifyDisconnectResponse>, Status> {
        self.finish(
            "NotifyDisconnect",
            Err(Status::unimplemented(
                "NotifyDisconnect is not served by this agent version",
            )),
        )
    }

    async fn get_active_sessions(
        &self,
        request: Request<pb::GetActiveSessionsRequest>,
    ) -> Result<Response<pb::GetActiveSessionsResponse>, Status> {
        let r = self.get_active_sessions_inner(request.into_inner()).await;
        self.finish("GetActiveSessions", r)
    }

    async fn disconnect_user(
        &self,
        request: Request<pb::DisconnectUserRequest>,
    ) -> Result<Response<pb::DisconnectUserResponse>, Status> {
        let r = self.disconnect_user_inner(request.into_inner()).await;
        self.finish("DisconnectUser", r)
    }

    async fn update_user_routes(
        &self,
        _request: Request<pb::UpdateUserRoutesRequest>,
    ) -> Result<Response<pb::UpdateUserRoutesResponse>, Status> {
        self.finish(
            "UpdateUserRoutes",
            Err(Status::unimplemented(
                "UpdateUserRoutes is not served by this agent version",
            )),
        )
    }
}

impl VpnAgent {
    async fn get_active_sessions_inner(
        &self,
        req: pb::GetActiveSessionsRequest,
    ) -> Result<pb::GetActiveSessionsResponse, Status> {
        let username = if req.username_filter.is_empty() {
            None
        } else {
            crate::validate::name("username_filter", &req.username_filter)
                .map_err(|e| invalid(e.field, e.reason))?;
            Some(req.username_filter)
        };
        let include_stats = req.include_stats;
        let view: SessionsView = call(SESSION_REGISTRY, self.call_timeout, true, |reply| {
            RegistryMsg::Query {
                username: username.clone(),
                reply,
            }
        })
        .await
        .map_err(actor_status)?;
        if !view.synced {
            return Err(Status::unavailable(format!(
                "the session list has not been synchronized with ocserv yet: {}",
                view.last_error
                    .as_deref()
                    .unwrap_or("first reconcile under way")
            )));
        }
        let sessions = if include_stats {
            // Fresh counters from the tun devices, read here on a blocking thread rather than in
            // the registry, so a large query never holds up the registry's mailbox.
            tokio::task::spawn_blocking(move || {
                view.sessions
                    .iter()
                    .map(|s| {
                        let fresh = (!s.device.is_empty())
                            .then(|| counters::read(&s.device, s.id, s.connected_at))
                            .flatten();
                        vpn_session(s, fresh.or(s.counters))
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| Status::internal(format!("reading session counters: {e}")))?
        } else {
            view.sessions.iter().map(|s| vpn_session(s, None)).collect()
        };
        Ok(pb::GetActiveSessionsResponse {
            total_count: u32::try_from(sessions.len()).unwrap_or(u32::MAX),
            sessions,
        })
    }

    async fn disconnect_user_inner(
        &self,
        req: pb::DisconnectUserRequest,
    ) -> Result<pb::DisconnectUserResponse, Status> {
        crate::validate::username(&req.username).map_err(|e| invalid(e.field, e.reason))?;
        if req.reason.len() > 1024 || req.reason.chars().any(char::is_control) {
            return Err(invalid(
                "reason",
                "must be at most 1024 bytes without control characters",
            ));
        }
        // Ask ocserv itself, not the registry: the answer must be current.
        let username = req.username.clone();
        let sessions = self
            .ctl(true, |r| CtlMsg::UserInfo(username.clone(), r))
            .await?;
        let targets = disconnect_targets(&sessions, req.disconnect_all_sessions);
        if targets.is_empty() {
            return Err(Status::not_found(format!(
                "username: no live session for user {:?}",
                req.username
            )));
        }
        let mut done = Vec::new();
        let mut errors = Vec::new();
        for id in targets {
            match self.ctl(false, |r| CtlMsg::TerminateId(id, r)).await {
                Ok(DisconnectOutcome::Done) => done.push(id),
                // Ended on its own between the listing and now.
                Ok(DisconnectOutcome::NotFound) => {}
                Err(e) => errors.push(format!("session {id}: {}", e.message())),
            }
        }
        tracing::info!(
            sessions = done.len(),
            reason = %req.reason,
            "disconnected sessions on request"
        );
        if !done.is_empty() {
            let ids = done.clone();
            // Best effort: the next reconcile removes them anyway.
            if let Some(cell) = ractor::registry::where_is(SESSION_REGISTRY) {
                let _ = cell.send_message(RegistryMsg::Forget(ids));
            }
        }
        if done.is_empty() && !errors.is_empty() {
            return Err(Status::unavailable(errors.join("; ")));
        }
        Ok(pb::DisconnectUserResponse {
            success: errors.is_empty(),
            sessions_disconnected: u32::try_from(done.len()).unwrap_or(u32::MAX),
            error_message: errors.join("; "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::tests::session;

    #[test]
    fn newest_session_is_the_single_target() {
        let s = vec![
            session(10, "a", 100),
            session(5, "a", 200),
            session(7, "a", 200),
        ];
        assert_eq!(disconnect_targets(&s, false), vec![7]);
        assert_eq!(disconnect_targets(&s, true), vec![10, 5, 7]);
        assert!(disconnect_targets(&[], true).is_empty());
        assert!(disconnect_targets(&[], false).is_empty());
    }

    #[test]
    fn session_mapping_fills_contract_fields() {
        let mut s = session(42, "jürgen", 1_700_000_000);
        s.groupname = "staff".into();
        s.client_ip = Some("192.0.2.7".parse().unwrap());
        s.vpn_ipv4 = Some("10.0.0.5".parse().unwrap());
        let c = ByteCounters {
            bytes_in: 10,
            bytes_out: 20,
        };
        let p = vpn_session(&s, Some(c));
        assert_eq!(p.session_id, "42");
        assert_eq!(p.username, "jürgen");
        assert_eq!(p.client_ip, "192.0.2.7");
        assert_eq!(p.vpn_ip, "10.0.0.5");
        assert_eq!(p.connected_at.unwrap().seconds, 1_700_000_000);
        assert_eq!((p.bytes_in, p.bytes_out), (10, 20));
        assert_eq!(p.metadata["groupname"], "staff");
        assert_eq!(p.metadata["ocserv_session_id"].len(), 28);
        let p = vpn_session(&s, None);
        assert_eq!((p.bytes_in, p.bytes_out), (0, 0));
    }
}
