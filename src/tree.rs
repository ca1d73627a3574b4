//! The names of the actor tree: which children the supervisor runs, in start order, and the
//! names they are registered under. Plain data, below both the actors and their messages.

/// The children of the root supervisor, in start order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Child {
    StateStore,
    OcservCtl,
    SessionRegistry,
    ConfigWriter,
    PortalLink,
    PolicyCache,
    MetricsServer,
    GrpcFrontDoor,
    HookListener,
}

impl Child {
    pub const ALL: [Child; 9] = [
        Child::StateStore,
        Child::OcservCtl,
        Child::SessionRegistry,
        Child::ConfigWriter,
        Child::PortalLink,
        Child::PolicyCache,
        Child::MetricsServer,
        Child::GrpcFrontDoor,
        Child::HookListener,
    ];

    /// The child registered under `name`, if any.
    pub fn from_name(name: &str) -> Option<Child> {
        Child::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The registered actor name (also the `actor` label of the restart counter).
    pub fn name(self) -> &'static str {
        match self {
            Child::StateStore => STATE_STORE,
            Child::OcservCtl => OCSERV_CTL,
            Child::SessionRegistry => SESSION_REGISTRY,
            Child::ConfigWriter => CONFIG_WRITER,
            Child::PortalLink => PORTAL_LINK,
            Child::MetricsServer => METRICS_SERVER,
            Child::GrpcFrontDoor => GRPC_FRONT_DOOR,
            Child::PolicyCache => POLICY_CACHE,
            Child::HookListener => HOOK_LISTENER,
        }
    }
}

pub const SUPERVISOR: &str = "supervisor";
pub const STATE_STORE: &str = "state_store";
pub const OCSERV_CTL: &str = "ocserv_ctl";
pub const SESSION_REGISTRY: &str = "session_registry";
pub const CONFIG_WRITER: &str = "config_writer";
pub const PORTAL_LINK: &str = "portal_link";
pub const METRICS_SERVER: &str = "metrics_server";
pub const GRPC_FRONT_DOOR: &str = "grpc_front_door";
pub const POLICY_CACHE: &str = "policy_cache";
pub const HOOK_LISTENER: &str = "hook_listener";
