//! The portal test double: a real tonic server of `vpn.v1.AuthService` and `vpn.v1.EventService`
//! (both on the same port and connections) on loopback (TCP port 0), over mTLS with certificates
//! generated at test time (into a tempdir, never committed), or plaintext.
//!
//! The test controls the answer per user ([`PortalDouble::answer`], default: allow with nothing),
//! an added latency ([`PortalDouble::set_latency`]), an error status returned to everybody
//! ([`PortalDouble::fail_with`]) and outages ([`PortalDouble::stop`]: the port is closed and every
//! open connection dropped; [`PortalDouble::resume`]: served again on the same port). It counts
//! `CheckPolicy` calls per user (a call is counted when it reached the service, i.e. after a
//! successful mTLS handshake, before the latency) and keeps the last request per user.
//!
//! `ValidateSession` answers valid unless the session was [`PortalDouble::invalidate`]d; every
//! request is kept with its arrival time ([`PortalDouble::validations`]).
//!
//! Every `EventService` request that reached the service is kept in arrival order
//! ([`PortalDouble::events`], duplicates included); [`PortalDouble::unique_events`] is what a
//! portal that drops duplicates of `metadata["event_id"]` keeps. Events are answered `success`
//! ([`PortalDouble::set_event_answer`]) and a session update can ask for the session's disconnect
//! ([`PortalDouble::disconnect_on_update`]). Latency and error apply to every call of both
//! services.
//!
//! ```ignore
//! let portal = PortalDouble::start_tls().await;
//! portal.answer("alice", PortalDouble::allow(&["10.1.0.0/16"], &["10.1.0.53"]));
//! config.portal = portal.config();          // endpoint, CA, client cert and key, server name
//! assert_eq!(portal.calls("alice"), 1);
//! portal.wait_events(|e| e.len() == 1, Duration::from_secs(10)).await;
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo};
use ocserv_agent::config::PortalConfig;
use ocserv_agent::proto::vpn::v1::auth_service_server::{AuthService, AuthServiceServer};
use ocserv_agent::proto::vpn::v1::event_service_server::{EventService, EventServiceServer};
use ocserv_agent::proto::vpn::v1::{
    CheckPolicyRequest, CheckPolicyResponse, ReportConnectRequest, ReportConnectResponse,
    ReportDisconnectRequest, ReportDisconnectResponse, ReportSessionUpdateRequest,
    ReportSessionUpdateResponse, ValidateSessionRequest, ValidateSessionResponse,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// What the double answers one user.
#[derive(Debug, Clone)]
pub enum Answer {
    Respond(CheckPolicyResponse),
    Fail(tonic::Code, String),
}

/// One `EventService` request as the double received it.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Connect(ReportConnectRequest),
    Disconnect(ReportDisconnectRequest),
    Update(ReportSessionUpdateRequest),
}

impl Event {
    /// `metadata["event_id"]`, `""` when missing.
    pub fn event_id(&self) -> &str {
        let metadata = match self {
            Event::Connect(r) => &r.metadata,
            Event::Disconnect(r) => &r.metadata,
            Event::Update(r) => &r.metadata,
        };
        metadata.get("event_id").map_or("", String::as_str)
    }

    /// The request's `session_id`.
    pub fn session_id(&self) -> &str {
        match self {
            Event::Connect(r) => &r.session_id,
            Event::Disconnect(r) => &r.session_id,
            Event::Update(r) => &r.session_id,
        }
    }

    /// The request's `username`.
    pub fn username(&self) -> &str {
        match self {
            Event::Connect(r) => &r.username,
            Event::Disconnect(r) => &r.username,
            Event::Update(r) => &r.username,
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            Event::Connect(_) => "connect",
            Event::Disconnect(_) => "disconnect",
            Event::Update(_) => "update",
        };
        write!(
            f,
            "{kind} user={:?} session_id={:?} event_id={:?}",
            self.username(),
            self.session_id(),
            self.event_id()
        )
    }
}

#[derive(Default)]
struct Control {
    answers: HashMap<String, Answer>,
    default: Option<Answer>,
    latency: Duration,
    error: Option<(tonic::Code, String)>,
    calls: HashMap<String, u64>,
    last: HashMap<String, CheckPolicyRequest>,
    events: Vec<Event>,
    /// Events are answered `success: false`.
    events_refused: bool,
    /// Session id → the disconnect reason a session update of it is answered.
    kick_on_update: HashMap<String, String>,
    /// Session id → why `ValidateSession` says it is invalid.
    invalid: HashMap<String, String>,
    validations: Vec<(Instant, ValidateSessionRequest)>,
}

impl Control {
    /// What every call goes through, taken when it reached the service: the latency, then the
    /// configured error if any.
    fn hold(&self) -> impl Future<Output = Result<(), tonic::Status>> + use<> {
        let (latency, error) = (self.latency, self.error.clone());
        async move {
            tokio::time::sleep(latency).await;
            error.map_or(Ok(()), |(code, message)| {
                Err(tonic::Status::new(code, message))
            })
        }
    }
}

#[derive(Clone, Default)]
struct Service {
    control: Arc<Mutex<Control>>,
}

impl Service {
    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `event`, then answers what `answer` makes of it (taken on arrival) after
    /// [`Control::hold`].
    async fn report<R>(
        &self,
        event: Event,
        answer: impl FnOnce(&Control, &Event) -> R,
    ) -> Result<tonic::Response<R>, tonic::Status> {
        let (hold, response) = {
            let mut c = self.lock();
            let response = answer(&c, &event);
            c.events.push(event);
            (c.hold(), response)
        };
        hold.await?;
        Ok(tonic::Response::new(response))
    }
}

#[tonic::async_trait]
impl AuthService for Service {
    async fn check_policy(
        &self,
        request: tonic::Request<CheckPolicyRequest>,
    ) -> Result<tonic::Response<CheckPolicyResponse>, tonic::Status> {
        let req = request.into_inner();
        let (hold, answer) = {
            let mut c = self.lock();
            *c.calls.entry(req.username.clone()).or_default() += 1;
            c.last.insert(req.username.clone(), req.clone());
            let answer = c.answers.get(&req.username).or(c.default.as_ref()).cloned();
            (c.hold(), answer)
        };
        hold.await?;
        match answer.unwrap_or_else(|| Answer::Respond(PortalDouble::allow(&[], &[]))) {
            Answer::Respond(r) => Ok(tonic::Response::new(r)),
            Answer::Fail(code, message) => Err(tonic::Status::new(code, message)),
        }
    }

    async fn validate_session(
        &self,
        request: tonic::Request<ValidateSessionRequest>,
    ) -> Result<tonic::Response<ValidateSessionResponse>, tonic::Status> {
        let req = request.into_inner();
        let (hold, response) = {
            let mut c = self.lock();
            let response = match c.invalid.get(&req.session_id) {
                Some(reason) => ValidateSessionResponse {
                    valid: false,
                    invalid_reason: reason.clone(),
                    force_disconnect: true,
                },
                None => ValidateSessionResponse {
                    valid: true,
                    ..Default::default()
                },
            };
            c.validations.push((Instant::now(), req));
            (c.hold(), response)
        };
        hold.await?;
        Ok(tonic::Response::new(response))
    }
}

#[tonic::async_trait]
impl EventService for Service {
    async fn report_connect(
        &self,
        request: tonic::Request<ReportConnectRequest>,
    ) -> Result<tonic::Response<ReportConnectResponse>, tonic::Status> {
        self.report(Event::Connect(request.into_inner()), |c, _| {
            ReportConnectResponse {
                success: !c.events_refused,
                ..Default::default()
            }
        })
        .await
    }

    async fn report_disconnect(
        &self,
        request: tonic::Request<ReportDisconnectRequest>,
    ) -> Result<tonic::Response<ReportDisconnectResponse>, tonic::Status> {
        self.report(Event::Disconnect(request.into_inner()), |c, _| {
            ReportDisconnectResponse {
                success: !c.events_refused,
                ..Default::default()
            }
        })
        .await
    }

    async fn report_session_update(
        &self,
        request: tonic::Request<ReportSessionUpdateRequest>,
    ) -> Result<tonic::Response<ReportSessionUpdateResponse>, tonic::Status> {
        self.report(Event::Update(request.into_inner()), |c, e| {
            let kick = c.kick_on_update.get(e.session_id());
            ReportSessionUpdateResponse {
                success: !c.events_refused,
                should_disconnect: kick.is_some(),
                disconnect_reason: kick.cloned().unwrap_or_default(),
            }
        })
        .await
    }
}

/// `events` without the later ones of an `event_id` already seen (events without one are kept).
fn unique(mut events: Vec<Event>) -> Vec<Event> {
    let mut seen = HashSet::new();
    events.retain(|e| e.event_id().is_empty() || seen.insert(e.event_id().to_string()));
    events
}

/// The certificates of one double, as PEM files in a tempdir.
pub struct TlsFiles {
    pub dir: tempfile::TempDir,
    /// The CA that signed the server's and the agent's certificates.
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Another CA, which signed neither the server nor the trusted client.
    pub other_ca: PathBuf,
    /// A client certificate and key signed by `other_ca`: the server does not trust it.
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
    server: rustls::ServerConfig,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf certificate (PEM) and its key (PEM) signed by `issuer`.
fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut p = CertificateParams::new(names).unwrap();
    p.distinguished_name.push(DnType::CommonName, "test leaf");
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl TlsFiles {
    fn generate() -> TlsFiles {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let main = ca("portal double CA");
        let other = ca("some other CA");
        let (server_pem, server_key) = leaf(
            &main,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_pem, client_key) =
            leaf(&main, &["agent.test"], ExtendedKeyUsagePurpose::ClientAuth);
        let (rogue_pem, rogue_key) =
            leaf(&other, &["agent.test"], ExtendedKeyUsagePurpose::ClientAuth);

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(main.der().clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let chain = CertificateDer::pem_slice_iter(server_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(server_key.as_bytes()).unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec()];
        TlsFiles {
            ca: write("ca.pem", &main.pem()),
            client_cert: write("client.pem", &client_pem),
            client_key: write("client.key", &client_key),
            other_ca: write("other-ca.pem", &other.pem()),
            rogue_cert: write("rogue.pem", &rogue_pem),
            rogue_key: write("rogue.key", &rogue_key),
            server,
            dir,
        }
    }
}

/// A running (or stopped) portal double.
pub struct PortalDouble {
    pub addr: SocketAddr,
    /// `https://localhost:PORT` (mTLS) or `http://127.0.0.1:PORT`.
    pub endpoint: String,
    pub tls: Option<TlsFiles>,
    service: Service,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    serving: Mutex<Option<JoinSet<()>>>,
}

impl PortalDouble {
    /// A double over mTLS (TLS 1.3; the client must present a certificate of its CA).
    pub async fn start_tls() -> PortalDouble {
        Self::start(true).await
    }

    /// A plaintext double on 127.0.0.1.
    pub async fn start_plain() -> PortalDouble {
        Self::start(false).await
    }

    async fn start(tls: bool) -> PortalDouble {
        let tls = tls.then(TlsFiles::generate);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let endpoint = match tls {
            Some(_) => format!("https://localhost:{}", addr.port()),
            None => format!("http://127.0.0.1:{}", addr.port()),
        };
        let double = PortalDouble {
            addr,
            endpoint,
            acceptor: tls
                .as_ref()
                .map(|t| tokio_rustls::TlsAcceptor::from(Arc::new(t.server.clone()))),
            tls,
            service: Service::default(),
            serving: Mutex::new(None),
        };
        double.serve(listener);
        double
    }

    /// `[portal]` pointed at this double, with the agent's trusted client certificate.
    pub fn config(&self) -> PortalConfig {
        let mut c = PortalConfig {
            endpoint: Some(self.endpoint.clone()),
            ..PortalConfig::default()
        };
        if let Some(t) = &self.tls {
            c.ca_file = Some(t.ca.clone());
            c.cert_file = Some(t.client_cert.clone());
            c.key_file = Some(t.client_key.clone());
        }
        c
    }

    fn serve(&self, listener: TcpListener) {
        let mut set = JoinSet::new();
        let routes = tonic::service::Routes::new(AuthServiceServer::new(self.service.clone()))
            .add_service(EventServiceServer::new(self.service.clone()))
            .prepare();
        let acceptor = self.acceptor.clone();
        set.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                // As a real gRPC server does: small answers must not wait on Nagle and the
                // client's delayed ACK (measured: overlapping calls stalled about 40 ms).
                let _ = tcp.set_nodelay(true);
                let (routes, acceptor) = (routes.clone(), acceptor.clone());
                conns.spawn(async move {
                    // Both services behind one connection, as the portal serves them.
                    let svc = hyper_util::service::TowerToHyperService::new(routes);
                    let http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(acceptor) => {
                            let handshake = acceptor.accept(tcp);
                            let Ok(Ok(tls)) =
                                tokio::time::timeout(Duration::from_secs(5), handshake).await
                            else {
                                return;
                            };
                            let _ = http2.serve_connection(TokioIo::new(tls), svc).await;
                        }
                        None => {
                            let _ = http2.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
                // Reap finished connections; dropping `conns` (on stop) aborts the rest.
                while conns.try_join_next().is_some() {}
            }
        });
        *self.serving.lock().unwrap() = Some(set);
    }

    /// Outage: closes the port and drops every open connection.
    pub async fn stop(&self) {
        let set = self.serving.lock().unwrap().take();
        if let Some(mut set) = set {
            set.abort_all();
            while set.join_next().await.is_some() {}
        }
    }

    /// Serves again on the same port after [`PortalDouble::stop`].
    pub async fn resume(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("rebinding {}: {e}; retrying", self.addr);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot rebind {}: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        self.service.lock()
    }

    /// An admission with these routes and DNS servers (strings as the portal sends them).
    pub fn allow(routes: &[&str], dns: &[&str]) -> CheckPolicyResponse {
        CheckPolicyResponse {
            allowed: true,
            routes: routes.iter().map(|s| s.to_string()).collect(),
            dns_servers: dns.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// A denial with its reason.
    pub fn deny(reason: &str) -> CheckPolicyResponse {
        CheckPolicyResponse {
            allowed: false,
            deny_reason: reason.to_string(),
            ..Default::default()
        }
    }

    /// What `user` is answered from now on.
    pub fn answer(&self, user: &str, response: CheckPolicyResponse) {
        self.lock()
            .answers
            .insert(user.to_string(), Answer::Respond(response));
    }

    /// `user` is answered with this error status from now on.
    pub fn answer_error(&self, user: &str, code: tonic::Code, message: &str) {
        self.lock()
            .answers
            .insert(user.to_string(), Answer::Fail(code, message.to_string()));
    }

    /// What users without an answer of their own get (default: allow with nothing).
    pub fn answer_others(&self, answer: Answer) {
        self.lock().default = Some(answer);
    }

    /// Time added before every answer.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Every call (of both services) is answered with this status (after the latency); `None`
    /// ends it.
    pub fn fail_with(&self, error: Option<(tonic::Code, &str)>) {
        self.lock().error = error.map(|(c, m)| (c, m.to_string()));
    }

    /// `CheckPolicy` calls that reached the service for `user`.
    pub fn calls(&self, user: &str) -> u64 {
        self.lock().calls.get(user).copied().unwrap_or(0)
    }

    /// `CheckPolicy` calls that reached the service, for every user.
    pub fn total_calls(&self) -> u64 {
        self.lock().calls.values().sum()
    }

    /// The last request received for `user`.
    pub fn last_request(&self, user: &str) -> Option<CheckPolicyRequest> {
        self.lock().last.get(user).cloned()
    }

    /// Every `EventService` request that reached the service, in arrival order, duplicates
    /// included.
    pub fn events(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    /// How many `EventService` requests reached the service, duplicates included (without
    /// copying them, so it can be polled while thousands arrive).
    pub fn event_count(&self) -> usize {
        self.lock().events.len()
    }

    /// [`PortalDouble::events`] without the later duplicates (same non-empty
    /// `metadata["event_id"]`): what a portal that drops duplicates keeps.
    pub fn unique_events(&self) -> Vec<Event> {
        unique(self.events())
    }

    /// How many events [`PortalDouble::unique_events`] dropped as duplicates.
    pub fn duplicates(&self) -> usize {
        let events = self.events();
        events.len() - unique(events.clone()).len()
    }

    /// Forgets the events received so far.
    pub fn clear_events(&self) {
        self.lock().events.clear();
    }

    /// The `success` every event is answered from now on (default `true`).
    pub fn set_event_answer(&self, success: bool) {
        self.lock().events_refused = !success;
    }

    /// Session updates of `session_id` are answered `should_disconnect` with this reason.
    pub fn disconnect_on_update(&self, session_id: &str, reason: &str) {
        self.lock()
            .kick_on_update
            .insert(session_id.to_string(), reason.to_string());
    }

    /// `ValidateSession` of `session_id` is answered invalid, with `force_disconnect`, from now on.
    pub fn invalidate(&self, session_id: &str, reason: &str) {
        self.lock()
            .invalid
            .insert(session_id.to_string(), reason.to_string());
    }

    /// Every `ValidateSession` request that reached the service, with its arrival time.
    pub fn validations(&self) -> Vec<(Instant, ValidateSessionRequest)> {
        self.lock().validations.clone()
    }

    /// The unique events once `pred` holds for them (polled every 20 ms); panics, listing every
    /// event received, when `timeout` passes first.
    pub async fn wait_events(
        &self,
        pred: impl Fn(&[Event]) -> bool,
        timeout: Duration,
    ) -> Vec<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.unique_events();
            if pred(&events) {
                return events;
            }
            if Instant::now() >= deadline {
                let received: Vec<String> = self.events().iter().map(Event::to_string).collect();
                panic!(
                    "the portal's events did not match within {timeout:?}; received {}:\n  {}",
                    received.len(),
                    received.join("\n  ")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
