//! The request-forgery guard: tenants' sessions must not reach the service's own network.
//!
//! A [`NetGuard`] refuses loopback, private, link-local, unspecified, shared (CGNAT), multicast,
//! documentation and reserved addresses, except networks in its allow list. It is checked on the
//! resolved IP of every request and every redirect hop: as a DNS resolver handed to the HTTP
//! client (so the address checked is the address connected to, no re-resolution race) and
//! directly for URLs whose host is an IP literal (which are never resolved).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// An address the guard refuses.
///
/// Its message reaches the tenant (the session's log and error), so it names neither the address
/// nor its class: a tenant must not learn what the service's internal names resolve to
/// (`http://db.internal/` → `10.0.0.7`). The operator's log has the detail, at debug level
/// ([`GuardRefused::trace`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "refused: private or local address (the network guard fetches only public addresses; the \
     operator can allow a network in [http_guard] allow_networks)"
)]
pub struct GuardRefused {
    /// The address.
    pub ip: IpAddr,
    /// Why it is refused (e.g. `private`, `loopback`).
    pub class: &'static str,
}

impl GuardRefused {
    /// Writes the refused address to the operator's log (debug level, never to a session's log).
    pub fn trace(&self, url: &str) {
        tracing::debug!(url, ip = %self.ip, class = self.class, "network guard refused a request");
    }
}

/// A bad allow-list entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("http_guard.allow_networks[{index}]: {value:?} is not a CIDR like 10.1.0.0/16: {reason}")]
pub struct GuardConfigError {
    /// Position in the list.
    pub index: usize,
    /// The entry.
    pub value: String,
    /// The parse error.
    pub reason: String,
}

/// Refuses non-public addresses except allow-listed networks.
#[derive(Debug, Clone, Default)]
pub struct NetGuard {
    allow: Vec<IpNet>,
}

impl NetGuard {
    /// A guard allowing exactly the given networks besides the public internet.
    pub fn new(allow: Vec<IpNet>) -> NetGuard {
        NetGuard { allow }
    }

    /// A guard from CIDR strings (e.g. config.toml's `allow_networks`).
    pub fn from_cidrs<S: AsRef<str>>(cidrs: &[S]) -> Result<NetGuard, GuardConfigError> {
        let mut allow = Vec::with_capacity(cidrs.len());
        for (index, c) in cidrs.iter().enumerate() {
            let c = c.as_ref();
            let net = c.parse::<IpNet>().map_err(|e| GuardConfigError {
                index,
                value: c.to_string(),
                reason: e.to_string(),
            })?;
            allow.push(net);
        }
        Ok(NetGuard { allow })
    }

    /// Ok when a request may go to `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), GuardRefused> {
        let Some(class) = non_public_class(ip) else {
            return Ok(());
        };
        let mapped = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        if self
            .allow
            .iter()
            .any(|n| n.contains(&ip) || mapped.is_some_and(|m| n.contains(&m)))
        {
            return Ok(());
        }
        Err(GuardRefused { ip, class })
    }
}

/// Why `ip` is not a public unicast address, or `None` when it is.
pub fn non_public_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return v4_class(v4);
            }
            let s = v6.segments();
            if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_loopback() {
                Some("loopback")
            } else if s[0] & 0xfe00 == 0xfc00 {
                Some("private (unique local)")
            } else if s[0] & 0xffc0 == 0xfe80 || s[0] & 0xffc0 == 0xfec0 {
                Some("link-local")
            } else if s[0] & 0xff00 == 0xff00 {
                Some("multicast")
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Some("documentation")
            } else if s[0] == 0x2001 && s[1] == 0 {
                // Teredo tunnels reach arbitrary IPv4 hosts.
                Some("tunnel (Teredo)")
            } else if s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0 {
                Some("discard-only")
            } else {
                None
            }
        }
    }
}

/// The IPv4 address inside an IPv4-mapped, IPv4-compatible, NAT64 or 6to4 IPv6 address: those
/// reach the IPv4 host, so they are judged as it.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let o = v6.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if s[..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || (s[5] == 0 && s[6] != 0)) {
        return Some(tail);
    }
    if s[0] == 0x0064 && s[1] == 0xff9b {
        return Some(tail);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if o[0] == 0 {
        Some("unspecified")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared (CGNAT)")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("reserved (IETF)")
    } else if (o[0] == 192 && o[1] == 0 && o[2] == 2)
        || (o[0] == 198 && o[1] == 51 && o[2] == 100)
        || (o[0] == 203 && o[1] == 0 && o[2] == 113)
    {
        Some("documentation")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking")
    } else if o[0] >= 224 && o[0] < 240 {
        Some("multicast")
    } else if o[0] >= 240 {
        Some("reserved")
    } else {
        None
    }
}

/// A DNS resolver for the HTTP client that drops refused addresses, and fails when none is left.
#[derive(Debug, Clone)]
pub(crate) struct GuardedResolver {
    pub(crate) guard: Arc<NetGuard>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .take(32)
                .collect();
            let mut first_refusal = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match guard.check(a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        first_refusal.get_or_insert(e);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let err: Box<dyn std::error::Error + Send + Sync> = match first_refusal {
                    Some(e) => Box::new(e),
                    None => format!("{} resolves to no address", name.as_str()).into(),
                };
                return Err(err);
            }
            let it: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(it)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        NetGuard::default().check(s.parse().unwrap()).is_err()
    }

    #[test]
    fn non_public_addresses_are_refused() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:a00:1::",
            "ff02::1",
            "192.0.2.1",
        ] {
            assert!(refused(a), "{a} should be refused");
        }
        for a in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "172.32.0.1",
        ] {
            assert!(!refused(a), "{a} should be allowed");
        }
    }

    #[test]
    fn allow_list_opens_a_network() {
        let g = NetGuard::from_cidrs(&["10.1.0.0/16", "127.0.0.0/8"]).unwrap();
        assert!(g.check("10.1.9.9".parse().unwrap()).is_ok());
        assert!(g.check("::ffff:127.0.0.1".parse().unwrap()).is_ok());
        assert!(g.check("10.2.0.1".parse().unwrap()).is_err());
        assert!(NetGuard::from_cidrs(&["10.0.0.0/33"]).is_err());
    }
}
