//! `PortalLink`: the agent's gRPC client to the portal's `vpn.v1.AuthService` and
//! `vpn.v1.EventService`, over one channel, behind one circuit breaker.
//!
//! Input: [`PortalMsg::CheckPolicy`] with a [`PolicyQuery`] (from the policy cache), and
//! [`PortalMsg::Validate`] with a live session (from the registry's revalidation). Output: a
//! [`PortalAnswer`] (the portal's decision, checked whole) or a [`Validation`], or a typed
//! [`PortalError`], always answered, never a hang.
//!
//! The outbox ([`PortalMsg::Drain`], sent by `StateStore` when it added events, and every
//! [`DRAIN_EVERY`]): one drain at a time (across restarts of the actor) reads the oldest
//! [`DRAIN_BATCH`] events from the store, sends each session's events in order, up to
//! [`DRAIN_AT_ONCE`] sessions side by side, each call behind the breaker like any other, removes
//! what the portal acknowledged (`success: true`; `false` is not an acknowledgement) and goes on
//! until the outbox is empty; at the first failure (breaker open, portal down, event refused) it
//! stops and the next drain waits 250 ms to 5 s (doubling). A session update answered with
//! `should_disconnect` kicks that session by its full identity (`POLICY_VIOLATION`, audited).
//!
//! Per call, in the handler and without awaiting anything: no endpoint configured →
//! [`PortalError::NotConfigured`]; already [`MAX_IN_FLIGHT`] calls in flight →
//! `Unavailable("too many portal calls in flight")`; the breaker rejects →
//! [`PortalError::BreakerOpen`] (no network call). Otherwise the call runs in its own task with the
//! deadline `portal.call_timeout` (sent to the portal as `grpc-timeout` and enforced here), the
//! task reports the outcome to the actor ([`PortalMsg::CallEnded`], recorded on the breaker) and
//! then answers the caller, so the next request of the same caller sees the breaker updated.
//!
//! What counts as a breaker failure: a timeout, a connect/TLS/transport error, and the statuses
//! `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `INTERNAL`, `RESOURCE_EXHAUSTED`, `UNKNOWN` and
//! `CANCELLED` (the portal did not decide). Any other status (`PERMISSION_DENIED`,
//! `INVALID_ARGUMENT`, `NOT_FOUND`, ...) and an answer refused as invalid are the portal working:
//! they count as successes, so one user's bad data never opens the breaker for everybody.
//!
//! The answer: `allowed`, `deny_reason` (control characters replaced by spaces, cut at
//! [`MAX_REASON_LEN`] bytes; an empty reason becomes "denied by the portal"), `routes`,
//! `dns_servers` and `should_disconnect` are all used. Routes are accepted as ocserv accepts
//! them in a per-user file: `address/prefix` or IPv4 `address/netmask` (contiguous), re-serialized
//! as CIDR; a route with host bits set, a bare address, or anything else refuses the whole answer
//! ([`PortalError::InvalidAnswer`] naming `routes[i]`), like the local policy file does. DNS
//! servers must be IP addresses (`dns_servers[i]`). A denial's routes and DNS are not used and not
//! checked. `metadata` carries nothing the agent acts on.
//!
//! Transport: `https://` is rustls with TLS 1.3 only (ring provider), the portal's CA from
//! `portal.ca_file` as the only trust root, the client certificate and key from
//! `portal.cert_file`/`portal.key_file`, verified against `portal.server_name` (else the
//! endpoint's host), ALPN `h2`. `http://` (loopback only, checked by the config) is plaintext and
//! warned about at start. The channel connects lazily and reconnects by itself, so a portal that
//! is down at start or comes back later needs nothing from the actor. The TLS files are loaded in
//! `pre_start`: a missing or unparsable file fails the start with an error naming the key
//! (`portal.cert_file: ...`). Whenever the configuration in force changes `[portal]` (on SIGHUP
//! only `portal.call_timeout` is live; the other keys wait for a process restart) the client is
//! rebuilt; when the new files cannot be loaded the old client stays and the error is logged.
//!
//! State across restarts: the [`Breaker`] and the in-flight bound live in [`PortalShared`] in the
//! shared context, so a crash or kill of this actor keeps an open breaker open (and calls keep
//! being rejected without reaching the portal). Call tasks outlive a restart: they answer their
//! callers and report their outcome to whichever incarnation is registered then (an outcome
//! that arrives while no incarnation is registered is lost; a lost probe expires after
//! `probe_timeout`). A change of `[portal.breaker]` or of `portal.call_timeout` (the probe's
//! timeout derives from it) starts a new, closed breaker.
//!
//! Metrics: `ocserv_agent_portal_requests_total{method,status}`,
//! `ocserv_agent_portal_request_duration_seconds{method}` (calls that went out only) and
//! `ocserv_agent_circuit_breaker_state{service="auth"}`, set at every change of state (an open
//! breaker whose `open_for` has passed turns half-open at the next call). The agent's readiness
//! never depends on the portal. No key material is ever logged.

use std::net::IpAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use ipnet::{IpNet, Ipv4Net};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::sync::Semaphore;
use tonic::transport::{Channel, Endpoint};

use crate::actors::{AbortOnDrop, Context, PORTAL_LINK};
use crate::breaker::{Acquire, Breaker, BreakerState, Outcome, Permit};
use crate::config::{Config, PortalConfig};
use crate::events::EventRequest;
use crate::messages::{PolicyQuery, PortalAnswer, PortalError, PortalMsg, Validation};
use crate::policy::Decision;
use crate::proto::vpn::v1::auth_service_client::AuthServiceClient;
use crate::proto::vpn::v1::event_service_client::EventServiceClient;
use crate::proto::vpn::v1::{
    CheckPolicyRequest, CheckPolicyResponse, ValidateSessionRequest, ValidateSessionResponse,
};
use crate::store::SessionRecord;

/// Portal calls in flight at once, across restarts of the actor; beyond it a call is answered
/// `Unavailable` at once. Single-flight in the policy cache keeps real numbers far below.
pub const MAX_IN_FLIGHT: usize = 256;

/// The longest denial reason kept from the portal, in bytes.
pub const MAX_REASON_LEN: usize = 256;

/// The `method` labels of this actor's calls (the events' come from [`EventRequest::method`]).
const CHECK_POLICY: &str = "CheckPolicy";
const VALIDATE_SESSION: &str = "ValidateSession";

/// The `service` label of the breaker's gauge.
const SERVICE: &str = "auth";

/// What outlives a restart of the actor (kept in [`Context::portal`]).
pub struct PortalShared {
    /// Created by the first incarnation from `[portal.breaker]`; replaced when that changes.
    breaker: Mutex<Option<Breaker>>,
    in_flight: Arc<Semaphore>,
    /// When the last call ended and its status label (for `HealthCheck`).
    last_call: Mutex<Option<(Instant, &'static str)>>,
    /// The outbox drain: whether one runs (at most one, across restarts of the actor), its
    /// failures in a row, and when the next may start.
    drain: Mutex<DrainState>,
}

#[derive(Debug, Default)]
struct DrainState {
    running: bool,
    failures: u32,
    not_before: Option<Instant>,
}

impl Default for PortalShared {
    fn default() -> Self {
        Self {
            breaker: Mutex::new(None),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            last_call: Mutex::new(None),
            drain: Mutex::new(DrainState::default()),
        }
    }
}

impl PortalShared {
    fn lock(&self) -> MutexGuard<'_, Option<Breaker>> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The breaker's state (closed before the actor first started).
    pub fn breaker_state(&self) -> BreakerState {
        self.lock()
            .as_ref()
            .map_or(BreakerState::Closed, |b| b.state())
    }

    /// How long ago the last portal call ended, and its status label.
    pub fn last_call(&self) -> Option<(Duration, &'static str)> {
        let last = *self.last_call.lock().unwrap_or_else(|p| p.into_inner());
        last.map(|(at, status)| (at.elapsed(), status))
    }

    fn call_ended(&self, status: &'static str) {
        *self.last_call.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), status));
    }
}

/// Why the portal client cannot be built: the key at fault and the reason (never file contents).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct PortalSetupError {
    pub key: &'static str,
    pub reason: String,
}

fn setup_err(key: &'static str, reason: impl Into<String>) -> PortalSetupError {
    PortalSetupError {
        key,
        reason: reason.into(),
    }
}

/// Reads a PEM file named by `key`.
fn read_pem(
    key: &'static str,
    path: Option<&std::path::PathBuf>,
) -> Result<Vec<u8>, PortalSetupError> {
    let path = path.ok_or_else(|| setup_err(key, "required when portal.endpoint is https"))?;
    std::fs::read(path).map_err(|e| setup_err(key, format!("cannot read {}: {e}", path.display())))
}

/// Certificates of a PEM file; at least one.
fn certificates(
    key: &'static str,
    path: Option<&std::path::PathBuf>,
) -> Result<Vec<CertificateDer<'static>>, PortalSetupError> {
    let pem = read_pem(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setup_err(key, format!("not a PEM certificate file: {e}")))?;
    match certs.is_empty() {
        true => Err(setup_err(key, "holds no PEM certificate")),
        false => Ok(certs),
    }
}

/// The rustls client configuration of `[portal]`: TLS 1.3 only, `ca_file` as the only root,
/// the client certificate and key, ALPN `h2`.
pub fn tls_config(cfg: &PortalConfig) -> Result<rustls::ClientConfig, PortalSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in certificates("portal.ca_file", cfg.ca_file.as_ref())? {
        roots
            .add(ca)
            .map_err(|e| setup_err("portal.ca_file", format!("unusable CA certificate: {e}")))?;
    }
    let chain = certificates("portal.cert_file", cfg.cert_file.as_ref())?;
    let key_pem = read_pem("portal.key_file", cfg.key_file.as_ref())?;
    // The parser's error says what was wrong with the file's structure, never its content.
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        setup_err(
            "portal.key_file",
            format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| setup_err("portal.endpoint", format!("TLS 1.3 unavailable: {e}")))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            setup_err(
                "portal.key_file",
                format!("does not fit portal.cert_file or is unsupported: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The client of `[portal]`'s `AuthService`, connecting lazily; `None` when no endpoint is
/// configured.
pub fn client(cfg: &PortalConfig) -> Result<Option<AuthServiceClient<Channel>>, PortalSetupError> {
    Ok(channel(cfg)?.map(AuthServiceClient::new))
}

/// The channel to `[portal]` (both of its services), connecting lazily; `None` when no endpoint
/// is configured.
pub fn channel(cfg: &PortalConfig) -> Result<Option<Channel>, PortalSetupError> {
    let Some(endpoint) = cfg.endpoint.as_deref() else {
        return Ok(None);
    };
    let ep = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| setup_err("portal.endpoint", e.to_string()))?
        .connect_timeout(cfg.call_timeout)
        .tcp_nodelay(true);
    if !cfg.is_tls() {
        tracing::warn!(
            endpoint,
            "portal.endpoint is plaintext http: decisions travel unencrypted and unauthenticated \
             (loopback only; use https with mTLS in production)"
        );
        return Ok(Some(ep.connect_lazy()));
    }
    let uri = ep.uri().clone();
    let host = uri
        .host()
        .ok_or_else(|| setup_err("portal.endpoint", "has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let name = cfg.server_name.clone().unwrap_or_else(|| host.clone());
    let server_name = ServerName::try_from(name.clone()).map_err(|e| {
        let key = match cfg.server_name {
            Some(_) => "portal.server_name",
            None => "portal.endpoint",
        };
        setup_err(key, format!("{name:?} is not a TLS server name: {e}"))
    })?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config(cfg)?));
    let connector = tower::service_fn(move |_: http::Uri| {
        let (tls, server_name, host) = (tls.clone(), server_name.clone(), host.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tls.connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Ok(Some(ep.connect_with_connector_lazy(connector)))
}

/// The request of `query`, stamped `now`.
pub fn request_of(query: &PolicyQuery, now: std::time::SystemTime) -> CheckPolicyRequest {
    let ip = |a: Option<IpAddr>| a.map(|a| a.to_string()).unwrap_or_default();
    CheckPolicyRequest {
        username: query.username.clone(),
        groupname: query.groupname.clone(),
        client_ip: ip(query.client_ip),
        vpn_ip: ip(query.vpn_ip),
        session_id: query.session_id.to_string(),
        device: query.device.clone(),
        request_time: Some(prost_types::Timestamp::from(now)),
    }
}

/// A route as ocserv accepts it: `address/prefix`, or IPv4 `address/netmask`; no host bits.
pub fn parse_route(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let (addr, mask) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a network (like \"10.0.0.0/8\")"))?;
    let net = match (
        IpNet::from_str(s),
        addr.parse::<std::net::Ipv4Addr>(),
        mask.parse(),
    ) {
        (Ok(net), _, _) => net,
        (Err(_), Ok(a), Ok(m)) => {
            let prefix = ipnet::ipv4_mask_to_prefix(m)
                .map_err(|_| format!("{s:?} has a non-contiguous netmask"))?;
            IpNet::V4(Ipv4Net::new(a, prefix).map_err(|e| format!("{s:?}: {e}"))?)
        }
        _ => return Err(format!("{s:?} is not a network (like \"10.0.0.0/8\")")),
    };
    match net == net.trunc() {
        true => Ok(net),
        false => Err(format!(
            "{s:?} has host bits set (the network is {})",
            net.trunc()
        )),
    }
}

/// A denial's reason as shown in logs and the hook's answer.
fn clean_reason(reason: &str) -> String {
    let mut out: String = reason
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > MAX_REASON_LEN {
        let mut cut = MAX_REASON_LEN;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    match out.is_empty() {
        true => "denied by the portal".to_owned(),
        false => out,
    }
}

/// Checks and maps the portal's answer: all of it, or nothing.
pub fn answer_of(r: CheckPolicyResponse) -> Result<PortalAnswer, PortalError> {
    let invalid = |field: String, reason: String| PortalError::InvalidAnswer { field, reason };
    let decision = match r.allowed {
        false => Decision::deny(clean_reason(&r.deny_reason)),
        true => {
            let routes =
                r.routes.iter().enumerate().map(|(i, s)| {
                    parse_route(s).map_err(|why| invalid(format!("routes[{i}]"), why))
                });
            let dns = r.dns_servers.iter().enumerate().map(|(i, s)| {
                s.trim().parse::<IpAddr>().map_err(|_| {
                    invalid(
                        format!("dns_servers[{i}]"),
                        format!("{s:?} is not an IP address"),
                    )
                })
            });
            Decision {
                routes: routes.collect::<Result<_, _>>()?,
                dns: dns.collect::<Result<_, _>>()?,
                ..Decision::allow()
            }
        }
    };
    Ok(PortalAnswer {
        decision,
        should_disconnect: r.should_disconnect,
    })
}

/// Whether `status` was made on this side (transport, timeout) rather than sent by the portal;
/// tonic attaches the underlying error as the source of the former.
fn local_cause(status: &tonic::Status) -> Option<PortalError> {
    let mut source = std::error::Error::source(status)?;
    loop {
        if source.is::<tonic::TimeoutExpired>() {
            return Some(PortalError::Timeout);
        }
        match source.source() {
            Some(next) => source = next,
            None => break,
        }
    }
    let mut message = status.message().to_owned();
    if let Some(inner) = std::error::Error::source(status) {
        let mut cause: Option<&dyn std::error::Error> = Some(inner);
        while let Some(c) = cause {
            let text = c.to_string();
            if !message.contains(&text) {
                message = format!("{message}: {text}");
            }
            cause = c.source();
        }
    }
    Some(PortalError::Unavailable(message))
}

/// Maps a failed call.
pub fn error_of(status: tonic::Status) -> PortalError {
    local_cause(&status).unwrap_or_else(|| PortalError::Status {
        code: status.code(),
        message: status.message().to_owned(),
    })
}

/// How a call's result counts on the breaker.
pub fn breaker_outcome<T>(result: &Result<T, PortalError>) -> Outcome {
    use tonic::Code;
    match result {
        Ok(_) | Err(PortalError::InvalidAnswer { .. }) => Outcome::Success,
        Err(PortalError::Timeout | PortalError::Unavailable(_)) => Outcome::Failure,
        Err(PortalError::Status { code, .. }) => match code {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Internal
            | Code::ResourceExhausted
            | Code::Unknown
            | Code::Cancelled => Outcome::Failure,
            _ => Outcome::Success,
        },
        // Never made a call.
        Err(PortalError::NotConfigured | PortalError::BreakerOpen) => Outcome::Success,
    }
}

/// Runs one portal call within `deadline` (sent as `grpc-timeout` and enforced here).
async fn bounded<T>(
    deadline: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, PortalError> {
    match tokio::time::timeout(deadline, call).await {
        Err(_) => Err(PortalError::Timeout),
        Ok(Err(status)) => Err(error_of(status)),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

fn timed<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

/// One `CheckPolicy` call.
async fn check_policy(
    channel: Channel,
    query: PolicyQuery,
    deadline: Duration,
) -> Result<PortalAnswer, PortalError> {
    let request = timed(request_of(&query, SystemTime::now()), deadline);
    let mut client = AuthServiceClient::new(channel);
    answer_of(bounded(deadline, client.check_policy(request)).await?)
}

/// The `ValidateSession` request of one live session.
pub fn validation_request(s: &SessionRecord, now: SystemTime) -> ValidateSessionRequest {
    ValidateSessionRequest {
        username: s.username.clone(),
        session_id: s.id.to_string(),
        client_ip: s.client_ip.map(|a| a.to_string()).unwrap_or_default(),
        request_time: Some(prost_types::Timestamp::from(now)),
    }
}

/// The portal's answer to `ValidateSession`; its reason cleaned like a denial's.
pub fn validation_of(r: ValidateSessionResponse) -> Validation {
    let reason = match r.invalid_reason.trim().is_empty() {
        true => "invalidated by the portal".to_string(),
        false => clean_reason(&r.invalid_reason),
    };
    Validation {
        valid: r.valid,
        force_disconnect: r.force_disconnect,
        reason,
    }
}

/// One `ValidateSession` call.
async fn validate_session(
    channel: Channel,
    session: SessionRecord,
    deadline: Duration,
) -> Result<Validation, PortalError> {
    let request = timed(validation_request(&session, SystemTime::now()), deadline);
    let mut client = AuthServiceClient::new(channel);
    Ok(validation_of(
        bounded(deadline, client.validate_session(request)).await?,
    ))
}

/// What the portal said to one event it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Acknowledged.
    Acked,
    /// Acknowledged, and the session must go (`ReportSessionUpdateResponse.should_disconnect`),
    /// for this reason.
    Disconnect(String),
}

/// One `EventService` call: `Ok` when the portal acknowledged the event (`success`); a
/// `success: false` answer is not an acknowledgement (the event is sent again later).
async fn report(
    channel: Channel,
    event: EventRequest,
    deadline: Duration,
) -> Result<Taken, PortalError> {
    let mut client = EventServiceClient::new(channel);
    let refused = |message: String| PortalError::InvalidAnswer {
        field: "success".into(),
        reason: format!("false: {}", clean_reason(&message)),
    };
    match event {
        EventRequest::Connect(r) => {
            let a = bounded(deadline, client.report_connect(timed(r, deadline))).await?;
            a.success
                .then_some(Taken::Acked)
                .ok_or_else(|| refused(a.message))
        }
        EventRequest::Disconnect(r) => {
            let a = bounded(deadline, client.report_disconnect(timed(r, deadline))).await?;
            a.success
                .then_some(Taken::Acked)
                .ok_or_else(|| refused(a.message))
        }
        EventRequest::Update(r) => {
            let a = bounded(deadline, client.report_session_update(timed(r, deadline))).await?;
            match (a.success, a.should_disconnect) {
                (false, _) => Err(refused(a.disconnect_reason)),
                (true, false) => Ok(Taken::Acked),
                (true, true) => {
                    let why = match a.disconnect_reason.trim().is_empty() {
                        true => "the portal's session update asked for it".to_string(),
                        false => clean_reason(&a.disconnect_reason),
                    };
                    Ok(Taken::Disconnect(why))
                }
            }
        }
    }
}

/// The right to make one portal call: a slot of the in-flight bound and a breaker permit.
struct Admission {
    slot: tokio::sync::OwnedSemaphorePermit,
    permit: Permit,
}

/// Takes a slot and a breaker permit, or says why not (nothing was sent).
fn admit(ctx: &Context) -> Result<Admission, PortalError> {
    let Ok(slot) = ctx.portal.in_flight.clone().try_acquire_owned() else {
        return Err(PortalError::Unavailable(
            "too many portal calls in flight".into(),
        ));
    };
    let (acquired, now_state) = {
        let mut b = ctx.portal.lock();
        match b.as_mut() {
            Some(b) => (b.try_acquire(Instant::now()), b.state()),
            None => (Acquire::Rejected, BreakerState::Open),
        }
    };
    ctx.metrics.set_breaker_state(SERVICE, now_state);
    match acquired {
        Acquire::Permit(permit) => Ok(Admission { slot, permit }),
        Acquire::Rejected => Err(PortalError::BreakerOpen),
    }
}

/// Makes one admitted call and accounts for it: metrics, the last call, the breaker (through
/// whichever incarnation of the actor runs).
async fn guarded<T>(
    ctx: &Context,
    method: &'static str,
    admission: Admission,
    call: impl std::future::Future<Output = Result<T, PortalError>>,
) -> Result<T, PortalError> {
    let started = Instant::now();
    let result = call.await;
    let status = result.as_ref().err().map_or("ok", PortalError::label);
    ctx.metrics
        .observe_portal(method, status, Some(started.elapsed()));
    ctx.portal.call_ended(status);
    if let Err(e) = &result {
        tracing::debug!(method, error = %e, probe = admission.permit.is_probe(), "portal call failed");
    }
    let outcome = breaker_outcome(&result);
    if let Some(cell) = ractor::registry::where_is(PORTAL_LINK) {
        let permit = admission.permit;
        let _ = cell.send_message(PortalMsg::CallEnded { permit, outcome });
    }
    drop(admission.slot);
    result
}

/// Outbox events read per round of a drain.
pub const DRAIN_BATCH: usize = 256;

/// Sessions whose events go out side by side in a drain.
pub const DRAIN_AT_ONCE: usize = 16;

/// The delay before the drain after `failures` failed ones in a row.
fn drain_backoff(failures: u32) -> Duration {
    // Short: while the breaker is open a drain makes no call at all, so trying often costs
    // nothing, and a portal that is back gets its events within seconds.
    crate::backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(5), 2.0)
        .map_or(Duration::from_secs(1), |b| {
            b.delay(failures.saturating_sub(1))
        })
}

/// Sends the outbox's events until it is empty or a call fails (the breaker open, the portal
/// down or refusing an event): `Ok` when empty.
async fn drain_outbox(ctx: &Arc<Context>, channel: &Channel) -> Result<(), PortalError> {
    loop {
        let store_ctx = ctx.clone();
        let peeked = tokio::task::spawn_blocking(move || store_ctx.store.outbox_peek(DRAIN_BATCH))
            .await
            .map_err(|e| PortalError::Unavailable(format!("outbox read task failed: {e}")))?
            .map_err(|e| PortalError::Unavailable(e.to_string()))?;
        if peeked.events.is_empty() && peeked.unreadable.is_empty() {
            return Ok(());
        }
        if !peeked.unreadable.is_empty() {
            tracing::error!(entries = ?peeked.unreadable, "unreadable outbox entries removed (never sent)");
        }
        let mut done = peeked.unreadable;
        let mut failed = None;
        let mut groups = tokio::task::JoinSet::new();
        for group in crate::events::by_session(peeked.events) {
            if groups.len() >= DRAIN_AT_ONCE {
                if let Some(Ok((acked, err))) = groups.join_next().await {
                    done.extend(acked);
                    failed = failed.or(err);
                }
            }
            groups.spawn(send_group(ctx.clone(), channel.clone(), group));
        }
        while let Some(joined) = groups.join_next().await {
            if let Ok((acked, err)) = joined {
                done.extend(acked);
                failed = failed.or(err);
            }
        }
        let store_ctx = ctx.clone();
        let removed =
            tokio::task::spawn_blocking(move || store_ctx.store.outbox_remove(&done)).await;
        match removed {
            Ok(Ok(depth)) => {
                ctx.metrics.outbox_depth.set(depth as i64);
            }
            Ok(Err(e)) => return Err(PortalError::Unavailable(e.to_string())),
            Err(e) => return Err(PortalError::Unavailable(format!("outbox task failed: {e}"))),
        }
        if let Some(e) = failed {
            return Err(e);
        }
    }
}

/// Sends one session's events in order, stopping at the first failure; returns the sequence
/// numbers acknowledged and the failure.
async fn send_group(
    ctx: Arc<Context>,
    channel: Channel,
    group: Vec<(u64, crate::store::OutboxEvent)>,
) -> (Vec<u64>, Option<PortalError>) {
    let mut acked = Vec::new();
    let (agent_id, deadline) = {
        let cfg = ctx.config();
        (cfg.agent.id.clone(), cfg.portal.call_timeout)
    };
    for (seq, event) in group {
        let request = crate::events::request_of(&event, &agent_id);
        let method = request.method();
        let sent = match admit(&ctx) {
            Ok(admission) => {
                let call = report(channel.clone(), request, deadline);
                guarded(&ctx, method, admission, call).await
            }
            Err(e) => {
                ctx.metrics.observe_portal(method, e.label(), None);
                Err(e)
            }
        };
        match sent {
            Ok(taken) => {
                acked.push(seq);
                if let Taken::Disconnect(why) = taken {
                    let s = &event.session;
                    let key = s.session_key();
                    let (ctx, user) = (ctx.clone(), s.username.clone());
                    let deadline = Instant::now() + 2 * ctx.config().ocserv.request_timeout;
                    tokio::spawn(async move {
                        crate::grpc::portal_kick(
                            &ctx,
                            "ReportSessionUpdate",
                            key,
                            &user,
                            &why,
                            deadline,
                        )
                        .await;
                    });
                }
            }
            Err(e) => return (acked, Some(e)),
        }
    }
    (acked, None)
}

pub struct PortalLink;

pub struct PortalState {
    ctx: Arc<Context>,
    channel: Option<Channel>,
    /// The configuration the client and breaker were built from.
    built_from: Arc<Config>,
    _drain_ticker: Option<AbortOnDrop>,
}

impl PortalState {
    fn follow_config(&mut self) {
        let live = self.ctx.config();
        if Arc::ptr_eq(&live, &self.built_from) {
            return;
        }
        if live.portal != self.built_from.portal {
            match channel(&live.portal) {
                Ok(c) => {
                    tracing::info!(endpoint = ?live.portal.endpoint, "portal client rebuilt");
                    self.channel = c;
                }
                Err(e) => {
                    tracing::error!(error = %e, "new [portal] settings unusable; keeping the old client");
                }
            }
            ensure_breaker(&self.ctx, &live.portal);
        }
        self.built_from = live;
    }

    /// Starts one call in a task, behind the in-flight bound and the breaker; the task answers.
    fn start<T, F>(
        &self,
        method: &'static str,
        reply: RpcReplyPort<Result<T, PortalError>>,
        call: impl FnOnce(Channel, Duration) -> F,
    ) where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, PortalError>> + Send + 'static,
    {
        let ctx = &self.ctx;
        let admitted = match &self.channel {
            None => Err(PortalError::NotConfigured),
            Some(c) => admit(ctx).map(|a| (a, c.clone())),
        };
        let (admission, channel) = match admitted {
            Ok(a) => a,
            Err(e) => {
                ctx.metrics.observe_portal(method, e.label(), None);
                let _ = reply.send(Err(e));
                return;
            }
        };
        let future = call(channel, self.built_from.portal.call_timeout);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let result = guarded(&ctx, method, admission, future).await;
            let _ = reply.send(result);
        });
    }

    /// Starts a drain of the outbox unless one runs, it is backing off, or events are not
    /// reported.
    fn drain(&self) {
        let Some(channel) = self.channel.clone() else {
            return;
        };
        if !self.built_from.portal.reports_events() {
            return;
        }
        {
            let mut d = self
                .ctx
                .portal
                .drain
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let waiting = d.not_before.is_some_and(|t| Instant::now() < t);
            if d.running || waiting {
                return;
            }
            d.running = true;
        }
        /// Frees the drain slot however the task ends (a panic included), so the outbox is
        /// never left without a drain.
        struct Running(Arc<Context>);
        impl Drop for Running {
            fn drop(&mut self) {
                let mut d = self
                    .0
                    .portal
                    .drain
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                d.running = false;
            }
        }
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            // Dropped last (after `d` below releases the lock), once the backoff is recorded.
            let _running = Running(ctx.clone());
            let result = drain_outbox(&ctx, &channel).await;
            let mut d = ctx.portal.drain.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(()) => {
                    if d.failures > 0 {
                        tracing::info!(failed = d.failures, "outbox drained again");
                    }
                    d.failures = 0;
                    d.not_before = None;
                }
                Err(e) => {
                    d.failures = d.failures.saturating_add(1);
                    let delay = drain_backoff(d.failures);
                    d.not_before = Some(Instant::now() + delay);
                    // Once per outage at warn; every further attempt at debug.
                    match d.failures {
                        1 => tracing::warn!(error = %e, "outbox drain failing; retrying"),
                        _ => tracing::debug!(error = %e, retry_in = ?delay, "outbox drain failing"),
                    }
                }
            }
        });
    }
}

fn ensure_breaker(ctx: &Context, cfg: &PortalConfig) {
    let settings = cfg.breaker_settings();
    let mut slot = ctx.portal.lock();
    if slot.as_ref().is_none_or(|b| *b.settings() != settings) {
        match Breaker::new(settings, rand::random()) {
            Ok(b) => *slot = Some(b),
            Err(e) => {
                tracing::error!(error = %e, "portal.breaker unusable; keeping the old breaker")
            }
        }
    }
    let state = slot.as_ref().map_or(BreakerState::Closed, |b| b.state());
    ctx.metrics.set_breaker_state(SERVICE, state);
}

/// How often the actor looks at the outbox on its own (besides being told of new events).
pub const DRAIN_EVERY: Duration = Duration::from_secs(1);

impl Actor for PortalLink {
    type Msg = PortalMsg;
    type State = PortalState;
    type Arguments = Arc<Context>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        ctx: Arc<Context>,
    ) -> Result<Self::State, ActorProcessingErr> {
        let built_from = ctx.config();
        let channel = channel(&built_from.portal)?;
        if channel.is_none() {
            tracing::debug!("no portal.endpoint: portal calls are answered NotConfigured");
        }
        ensure_breaker(&ctx, &built_from.portal);
        let ticker = myself.send_interval(DRAIN_EVERY, || PortalMsg::Drain);
        Ok(PortalState {
            ctx,
            channel,
            built_from,
            _drain_ticker: Some(ticker.into()),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.follow_config();
        let ctx = &state.ctx;
        match msg {
            PortalMsg::CheckPolicy { request, reply } => {
                state.start(CHECK_POLICY, reply, |c, d| check_policy(c, request, d))
            }
            PortalMsg::Validate { session, reply } => {
                state.start(VALIDATE_SESSION, reply, |c, d| {
                    validate_session(c, session, d)
                })
            }
            PortalMsg::Drain => state.drain(),
            PortalMsg::CallEnded { permit, outcome } => {
                let mut b = ctx.portal.lock();
                if let Some(b) = b.as_mut() {
                    if let Some(changed) = b.record(permit, outcome, Instant::now()) {
                        tracing::info!(state = changed.as_str(), "portal circuit breaker changed");
                        ctx.metrics.set_breaker_state(SERVICE, changed);
                    }
                }
            }
            PortalMsg::Crash => panic!("chaos: crash requested for {PORTAL_LINK}"),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn response(routes: &[&str], dns: &[&str]) -> CheckPolicyResponse {
        CheckPolicyResponse {
            allowed: true,
            routes: routes.iter().map(|s| s.to_string()).collect(),
            dns_servers: dns.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn routes_are_taken_as_ocserv_takes_them() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(parse_route("10.0.0.0/8"), Ok(net("10.0.0.0/8")));
        assert_eq!(
            parse_route(" 192.168.1.0/255.255.255.0 "),
            Ok(net("192.168.1.0/24"))
        );
        assert_eq!(parse_route("fd00::/64"), Ok(net("fd00::/64")));
        assert_eq!(parse_route("0.0.0.0/0"), Ok(net("0.0.0.0/0")));
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0",
            "default",
            "10.0.0.0/33",
            "10.0.0.0/255.0.255.0",
            "10.0.0.0/8\nroute = 0.0.0.0/0",
            "",
        ] {
            assert!(parse_route(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn an_answer_is_taken_whole_or_refused() {
        let a = answer_of(CheckPolicyResponse {
            should_disconnect: true,
            ..response(
                &["10.1.0.0/16", "192.168.7.0/255.255.255.0"],
                &["10.1.0.53", "fd00::53"],
            )
        })
        .unwrap();
        assert!(a.decision.allowed && a.should_disconnect);
        assert_eq!(a.decision.routes.len(), 2);
        assert_eq!(a.decision.routes[1].to_string(), "192.168.7.0/24");
        assert_eq!(a.decision.dns.len(), 2);
        assert_eq!(a.decision.reason, None);

        let e = answer_of(response(&["10.1.0.0/16", "nonsense"], &[])).unwrap_err();
        match e {
            PortalError::InvalidAnswer { field, reason } => {
                assert_eq!(field, "routes[1]");
                assert!(reason.contains("nonsense"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let e = answer_of(response(&[], &["10.0.0.1", "dns.example"])).unwrap_err();
        assert!(
            matches!(e, PortalError::InvalidAnswer { ref field, .. } if field == "dns_servers[1]")
        );
    }

    #[test]
    fn a_denial_keeps_a_clean_reason_and_ignores_routes() {
        let deny = |reason: &str| CheckPolicyResponse {
            allowed: false,
            deny_reason: reason.into(),
            routes: vec!["garbage".into()],
            ..Default::default()
        };
        let a = answer_of(deny("account\nexpired")).unwrap();
        assert!(!a.decision.allowed);
        assert_eq!(a.decision.reason.as_deref(), Some("account expired"));
        assert!(a.decision.routes.is_empty());
        let a = answer_of(deny("")).unwrap();
        assert_eq!(a.decision.reason.as_deref(), Some("denied by the portal"));
        let long = "é".repeat(400);
        let a = answer_of(deny(&long)).unwrap();
        assert!(a.decision.reason.unwrap().len() <= MAX_REASON_LEN);
    }

    #[test]
    fn every_request_field_is_filled() {
        let q = PolicyQuery {
            username: "alice".into(),
            groupname: "staff".into(),
            client_ip: Some("192.0.2.7".parse().unwrap()),
            vpn_ip: Some("10.10.0.5".parse().unwrap()),
            session_id: 4242,
            device: "vpns0".into(),
        };
        let r = request_of(
            &q,
            std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(5),
        );
        assert_eq!(r.username, "alice");
        assert_eq!(r.groupname, "staff");
        assert_eq!(r.client_ip, "192.0.2.7");
        assert_eq!(r.vpn_ip, "10.10.0.5");
        assert_eq!(r.session_id, "4242");
        assert_eq!(r.device, "vpns0");
        assert_eq!(r.request_time.unwrap().seconds, 5);
    }

    #[test]
    fn only_a_portal_that_does_not_decide_is_a_breaker_failure() {
        let status = |code| -> Result<PortalAnswer, PortalError> {
            Err(PortalError::Status {
                code,
                message: String::new(),
            })
        };
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::ResourceExhausted,
            Code::Unknown,
        ] {
            assert_eq!(breaker_outcome(&status(code)), Outcome::Failure, "{code:?}");
        }
        for code in [
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::NotFound,
        ] {
            assert_eq!(breaker_outcome(&status(code)), Outcome::Success, "{code:?}");
        }
        assert_eq!(
            breaker_outcome::<()>(&Err(PortalError::Timeout)),
            Outcome::Failure
        );
        let down: Result<(), _> = Err(PortalError::Unavailable("refused".into()));
        assert_eq!(breaker_outcome(&down), Outcome::Failure);
        let bad: Result<(), _> = Err(PortalError::InvalidAnswer {
            field: "routes[0]".into(),
            reason: "x".into(),
        });
        assert_eq!(breaker_outcome(&bad), Outcome::Success);
    }

    #[test]
    fn statuses_from_the_portal_and_from_the_transport_are_told_apart() {
        let sent = tonic::Status::permission_denied("no");
        assert_eq!(
            error_of(sent),
            PortalError::Status {
                code: Code::PermissionDenied,
                message: "no".into()
            }
        );
        let local = tonic::Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(error_of(local), PortalError::Timeout);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let local = tonic::Status::from_error(Box::new(io));
        assert!(matches!(error_of(local), PortalError::Unavailable(m) if m.contains("refused")));
    }

    #[test]
    fn tls_files_failing_to_load_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem at all").unwrap();
        let cfg = |ca: &std::path::Path, cert: &std::path::Path| PortalConfig {
            endpoint: Some("https://portal.example:8443".into()),
            ca_file: Some(ca.to_path_buf()),
            cert_file: Some(cert.to_path_buf()),
            key_file: Some(dir.path().join("missing-key.pem")),
            ..PortalConfig::default()
        };
        let missing = dir.path().join("missing.pem");
        let e = tls_config(&cfg(&missing, &junk)).unwrap_err();
        assert_eq!(e.key, "portal.ca_file");
        assert!(
            e.to_string().starts_with("portal.ca_file: cannot read"),
            "{e}"
        );
        let e = tls_config(&cfg(&junk, &junk)).unwrap_err();
        assert_eq!(e.key, "portal.ca_file");
        assert!(e.reason.contains("no PEM certificate"), "{e}");
    }

    #[tokio::test]
    async fn no_endpoint_no_client() {
        assert!(client(&PortalConfig::default()).unwrap().is_none());
        let plain = PortalConfig {
            endpoint: Some("http://127.0.0.1:9".into()),
            ..PortalConfig::default()
        };
        assert!(client(&plain).unwrap().is_some());
    }
}
