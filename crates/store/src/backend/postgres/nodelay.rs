//! `TCP_NODELAY` on each PostgreSQL connection, which sqlx 0.9.0 no longer sets.
//!
//! sqlx 0.9.0 dropped the option (launchbadge/sqlx#4335; fixed upstream by #4336, not released
//! as of 0.9.0). Without it, a statement larger than one TCP segment ends in a short segment that
//! Nagle's algorithm holds until the server's delayed ACK, about 40 ms: a 250-row dispatch insert
//! took 45 ms instead of 3 ms here, and every large group commit of events waited as long. sqlx
//! gives no access to its socket, so each new connection asks the server for its ports, finds the
//! socket with those ports among this process's descriptors and sets the option. Remove this
//! module once sqlx sets the option again.

use sqlx::PgConnection;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};

/// Sets `TCP_NODELAY` on the socket of `conn`, best effort: a connection is never refused for
/// it. A Unix-socket connection has nothing to set; a connection through a proxy or NAT, whose
/// ports the server sees differently, or a process without `/proc`, is left as sqlx made it
/// (logged).
pub(super) async fn set_on(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    let Some((local, peer)) = ports(conn).await? else {
        return Ok(());
    };
    match with_socket(local, peer, |s| s.set_tcp_nodelay(true)) {
        Ok(Some(())) => {}
        Ok(None) => tracing::warn!(
            local,
            peer,
            "no socket of this process has the ports PostgreSQL reports; TCP_NODELAY not set (large statements may wait ~40 ms)"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "could not set TCP_NODELAY on a PostgreSQL connection")
        }
    }
    Ok(())
}

/// The connection's (client, server) ports as the server sees them; `None` over a Unix socket.
async fn ports(conn: &mut PgConnection) -> Result<Option<(u16, u16)>, sqlx::Error> {
    let (client, server): (Option<i32>, Option<i32>) =
        sqlx::query_as("SELECT inet_client_port(), inet_server_port()")
            .fetch_one(conn)
            .await?;
    let port = |p: Option<i32>| p.and_then(|p| u16::try_from(p).ok());
    Ok(port(client).zip(port(server)))
}

/// Runs `f` on the TCP socket of this process with these local and peer ports, if there is one.
fn with_socket<T>(
    local: u16,
    peer: u16,
    f: impl FnOnce(socket2::SockRef<'_>) -> std::io::Result<T>,
) -> std::io::Result<Option<T>> {
    let port_of = |addr: std::io::Result<socket2::SockAddr>| {
        addr.ok()
            .and_then(|a| a.as_socket())
            .map(|a: SocketAddr| a.port())
    };
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Some(fd) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is borrowed for the few system calls below only. Should another
        // thread close it meanwhile, they fail with EBADF, or, if the number was reused, act on a
        // socket whose ports then do not match: neither touches memory.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        if port_of(socket.local_addr()) == Some(local) && port_of(socket.peer_addr()) == Some(peer)
        {
            return f(socket).map(Some);
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    /// Fails when sqlx sets `TCP_NODELAY` itself again: then delete this module.
    #[tokio::test]
    async fn sets_the_option_sqlx_leaves_off() {
        let url = std::env::var("HERALD_TEST_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let mut conn = match PgConnection::connect(&url).await {
            Ok(conn) => conn,
            Err(e) if std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true")) => {
                panic!("PostgreSQL test cannot run under CI=true: {url}: {e}")
            }
            Err(e) => {
                eprintln!("skipping PostgreSQL test: {url}: {e}");
                return;
            }
        };
        let (local, peer) = ports(&mut conn).await.unwrap().expect("a TCP connection");
        let nodelay = || with_socket(local, peer, |s| s.tcp_nodelay()).unwrap();
        assert_eq!(nodelay(), Some(false), "sqlx sets TCP_NODELAY again");
        set_on(&mut conn).await.unwrap();
        assert_eq!(nodelay(), Some(true));
    }
}
