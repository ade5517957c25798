//! The one module of the proxy allowed to use `unsafe`: thin wrappers around two Linux system
//! calls the standard library does not expose.
//!
//! - [`original_dst`]: `getsockopt(SO_ORIGINAL_DST)` (IPv4, `SOL_IP`) and
//!   `getsockopt(IP6T_SO_ORIGINAL_DST)` (IPv6, `SOL_IPV6`): the destination a connection had
//!   before an iptables/nftables `REDIRECT` rewrote it to the proxy.
//! - [`splice`] / [`Pipe`]: zero-copy forwarding between two sockets through a kernel pipe,
//!   used for plaintext passthrough.
//! - [`raise_nofile_limit`]: `getrlimit`/`setrlimit(RLIMIT_NOFILE)`, the soft open-files limit
//!   raised to the hard one at start (every proxied connection holds two sockets).
//! - [`set_tcp_ulp`]: `setsockopt(TCP_ULP)`, used to probe for kernel TLS ([`crate::ktls`]).
//!
//! Safety argument, for every call below: the file descriptors come from live tokio sockets
//! borrowed for the duration of the call (so they cannot be closed concurrently), the output
//! buffers are stack values of exactly the size passed to the kernel, and every return value is
//! checked before the output is read. The `rlimit` calls get a pointer to a local `rlimit`.
#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `SO_ORIGINAL_DST` from `<linux/netfilter_ipv4.h>` (same value as `IP6T_SO_ORIGINAL_DST`).
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The pre-REDIRECT destination of a redirected TCP connection. `is_v6` says which socket
/// family the accepted socket has; on a dual-stack socket an IPv4 connection (v4-mapped peer)
/// answers only the IPv4 query, so the other family is tried when the first one fails.
pub fn original_dst(sock: &impl AsRawFd, is_v6: bool) -> io::Result<SocketAddr> {
    let fd = sock.as_raw_fd();
    original_dst_family(fd, is_v6).or_else(|e| original_dst_family(fd, !is_v6).map_err(|_| e))
}

fn original_dst_family(fd: RawFd, is_v6: bool) -> io::Result<SocketAddr> {
    if is_v6 {
        let a: libc::sockaddr_in6 = getsockopt_original_dst(fd)?;
        let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(a.sin6_port),
            a.sin6_flowinfo,
            a.sin6_scope_id,
        )))
    } else {
        let a: libc::sockaddr_in = getsockopt_original_dst(fd)?;
        let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(a.sin_port),
        )))
    }
}

/// The kernel address structs `SO_ORIGINAL_DST` answers with, and the socket level to ask at.
/// Implemented only for plain C structs for which all-zero bytes are a valid value.
trait OriginalDstStruct: Copy {
    const LEVEL: libc::c_int;
}

impl OriginalDstStruct for libc::sockaddr_in {
    const LEVEL: libc::c_int = libc::SOL_IP;
}

impl OriginalDstStruct for libc::sockaddr_in6 {
    const LEVEL: libc::c_int = libc::SOL_IPV6;
}

/// `getsockopt(fd, T::LEVEL, SO_ORIGINAL_DST)` into a zeroed `T`.
fn getsockopt_original_dst<T: OriginalDstStruct>(fd: RawFd) -> io::Result<T> {
    let mut addr = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: fd is a live socket; addr points to a T of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            T::LEVEL,
            SO_ORIGINAL_DST,
            addr.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled the struct (rc == 0); it was zero-initialized anyway, and
    // all-zero bytes are a valid `T` (see `OriginalDstStruct`).
    Ok(unsafe { addr.assume_init() })
}

/// A non-blocking kernel pipe (read end, write end) used as the splice buffer.
#[derive(Debug)]
pub struct Pipe {
    /// Read end.
    pub read: OwnedFd,
    /// Write end.
    pub write: OwnedFd,
}

impl Pipe {
    /// Creates a non-blocking, close-on-exec pipe.
    pub fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds is an array of two ints as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, both fds are fresh and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Self { read, write })
    }
}

/// `splice(2)` up to `len` bytes from `from` to `to` (one of them must be a pipe), non-blocking.
/// Returns the number of bytes moved; `Ok(0)` means end of file on `from`; `WouldBlock` means
/// try again when ready.
pub fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain fds, null offsets (sockets and pipes have no offset).
    let rc = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// `shutdown(fd, SHUT_WR)`: sends FIN, keeps reading possible (half-close).
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain fd of a live socket.
    let rc = unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // The peer may already be gone: nothing left to half-close.
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// `setsockopt(SOL_TCP, TCP_ULP, name)`: attaches an upper-layer protocol (e.g. `tls`) to a
/// connected TCP socket.
pub fn set_tcp_ulp(sock: &impl AsRawFd, name: &str) -> io::Result<()> {
    let len = libc::socklen_t::try_from(name.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ULP name too long"))?;
    // SAFETY: live fd; the kernel reads exactly `len` bytes from `name`.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            name.as_ptr().cast(),
            len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit. Returns `(old soft, new soft)`.
pub fn raise_nofile_limit() -> io::Result<(libc::rlim_t, libc::rlim_t)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit the kernel fills in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let old = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: lim is a valid rlimit read above; only the soft limit changed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((old, lim.rlim_cur))
}

#[cfg(test)]
mod tests {
    /// (soft, hard) "Max open files" from /proc/self/limits ("unlimited" = u64::MAX).
    fn nofile() -> (u64, u64) {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(3)
            .take(2)
            .map(|x| x.parse().unwrap_or(u64::MAX))
            .collect();
        (v[0], v[1])
    }

    #[test]
    fn nofile_soft_limit_is_raised_to_the_hard_limit() {
        let (_, new) = super::raise_nofile_limit().unwrap();
        let (soft, hard) = nofile();
        assert_eq!(soft, hard);
        assert!(new == soft || (new == libc::RLIM_INFINITY && soft == u64::MAX));
    }
}
