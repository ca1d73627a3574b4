//! placeholder: being written
use super::*;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct OcctlBackend {
    pub occtl: PathBuf,
    pub socket: PathBuf,
    pub timeout: Duration,
}

impl OcctlBackend {
    pub fn new(occtl: PathBuf, socket: PathBuf, timeout: Duration) -> Self {
        Self {
            occtl,
            socket,
            timeout,
        }
    }
}

impl OcservBackend for OcctlBackend {
    async fn status(&self) -> CtlResult<ServerStatus> {
        todo!()
    }
    async fn list(&self) -> CtlResult<Vec<Session>> {
        todo!()
    }
    async fn user_info(&self, _username: &str) -> CtlResult<Vec<Session>> {
        todo!()
    }
    async fn id_info(&self, _id: u32) -> CtlResult<Option<Session>> {
        todo!()
    }
    async fn disconnect_name(&self, _username: &str) -> CtlResult<DisconnectOutcome> {
        todo!()
    }
    async fn disconnect_id(&self, _id: u32) -> CtlResult<DisconnectOutcome> {
        todo!()
    }
    async fn terminate_user(&self, _username: &str) -> CtlResult<DisconnectOutcome> {
        todo!()
    }
    async fn terminate_id(&self, _id: u32) -> CtlResult<DisconnectOutcome> {
        todo!()
    }
    async fn list_banned(&self) -> CtlResult<Vec<Ban>> {
        todo!()
    }
    async fn unban_ip(&self, _ip: IpAddr) -> CtlResult<DisconnectOutcome> {
        todo!()
    }
    async fn reload(&self) -> CtlResult<()> {
        todo!()
    }
    async fn list_cookies(&self) -> CtlResult<Vec<Cookie>> {
        todo!()
    }
}
