//! A control-socket client: one request, one reply.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;
use switchyard_switch::backend::fdpass;

use crate::error::{Error, ErrorCode, Result};
use crate::proto::{self, Request, Response};

/// The default socket: `/run/switchyard/control.sock` for root,
/// `$XDG_RUNTIME_DIR/switchyard/control.sock` otherwise.
pub fn default_socket() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/run/switchyard/control.sock");
    }
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("/run/user/{}", nix::unistd::geteuid())));
    base.join("switchyard/control.sock")
}

pub struct Client {
    rd: BufReader<UnixStream>,
    wr: UnixStream,
    next_id: u64,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client> {
        let s = UnixStream::connect(path).map_err(|e| {
            Error::unavailable(format!(
                "cannot reach the daemon at {}: {e} (is `switchyard daemon` running?)",
                path.display()
            ))
        })?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
        let wr = s.try_clone()?;
        Ok(Client {
            rd: BufReader::new(s),
            wr,
            next_id: 1,
        })
    }

    pub fn call_value(&mut self, method: &str, params: Value) -> Result<Value> {
        self.exchange(method, params, None)
    }

    /// A request with a file descriptor attached to its bytes (`SCM_RIGHTS`).
    pub fn call_with_fd<T: DeserializeOwned>(
        &mut self,
        method: &str,
        params: impl serde::Serialize,
        fd: BorrowedFd<'_>,
    ) -> Result<T> {
        let p = serde_json::to_value(params).map_err(|e| Error::internal(e.to_string()))?;
        let v = self.exchange(method, p, Some(fd))?;
        serde_json::from_value(v).map_err(|e| Error::internal(format!("unexpected reply: {e}")))
    }

    fn exchange(
        &mut self,
        method: &str,
        params: Value,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let req = Request {
            v: proto::VERSION,
            id,
            method: method.into(),
            params,
        };
        let mut line = serde_json::to_vec(&req).map_err(|e| Error::internal(e.to_string()))?;
        line.push(b'\n');
        // A daemon that refuses us replies first and closes: read its reply even when the send
        // failed, so the user sees why.
        let sent = match fd {
            None => self.wr.write_all(&line),
            Some(fd) => fdpass::send_with_fd(&self.wr, &line, Some(fd)),
        };
        let mut buf = String::new();
        let n = self.rd.read_line(&mut buf);
        match (sent, n) {
            (_, Ok(n)) if n > 0 => {}
            (Err(e), _) => return Err(Error::unavailable(format!("sending to the daemon: {e}"))),
            (Ok(()), Ok(_)) => return Err(Error::unavailable("the daemon closed the connection")),
            (Ok(()), Err(e)) => {
                return Err(Error::unavailable(format!(
                    "reading the daemon's reply: {e}"
                )))
            }
        }
        let resp: Response = serde_json::from_str(&buf)
            .map_err(|e| Error::internal(format!("malformed reply from the daemon: {e}")))?;
        if resp.ok {
            Ok(resp.result.unwrap_or(Value::Null))
        } else {
            Err(resp
                .error
                .unwrap_or_else(|| Error::new(ErrorCode::Internal, "error without a message")))
        }
    }

    pub fn call<T: DeserializeOwned>(
        &mut self,
        method: &str,
        params: impl serde::Serialize,
    ) -> Result<T> {
        let p = serde_json::to_value(params).map_err(|e| Error::internal(e.to_string()))?;
        let v = self.call_value(method, p)?;
        serde_json::from_value(v).map_err(|e| Error::internal(format!("unexpected reply: {e}")))
    }
}
