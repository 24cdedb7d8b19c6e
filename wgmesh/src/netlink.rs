//! Links, policy routing and link events through rtnetlink, in process (never `ip`). Every operation
//! is idempotent: it reads what is there and changes only what differs.

use std::{
    collections::BTreeMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use futures::{Stream, StreamExt as _, TryStreamExt as _};
use ipnet::IpNet;
use rtnetlink::{
    Handle, IpVersion, LinkUnspec, MulticastGroup, RouteMessageBuilder,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        address::AddressAttribute,
        link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open a netlink socket")]
    Connect(#[source] io::Error),
    #[error("netlink {operation} failed")]
    Request {
        operation: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface {0} does not exist")]
    NoSuchLink(String),
    #[error("cannot write sysctl {path}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
}

fn req(operation: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let operation = operation.into();
    move |source| Error::Request { operation, source }
}

/// The facts about a link the agent cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub up: bool,
    /// `veth`, `wireguard`, `tun`, `bridge`, ... (None for links without a kind, e.g. `lo`).
    pub kind: Option<String>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Option<Self> {
        let mut name = None;
        let mut mtu = 0;
        let mut kind = None;
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Mtu(m) => mtu = *m,
                LinkAttribute::LinkInfo(infos) => {
                    for i in infos {
                        if let LinkInfo::Kind(k) = i {
                            kind = Some(kind_name(k));
                        }
                    }
                }
                _ => {}
            }
        }
        Some(Self {
            index: msg.header.index,
            name: name?,
            mtu,
            up: msg.header.flags.contains(LinkFlags::Up),
            kind,
        })
    }

    pub fn is_veth(&self) -> bool {
        self.kind.as_deref() == Some("veth")
    }
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Veth => "veth".into(),
        InfoKind::Wireguard => "wireguard".into(),
        InfoKind::Tun => "tun".into(),
        InfoKind::Bridge => "bridge".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A change of the set of links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link appeared or changed (name, state, MTU).
    Changed(Link),
    Removed {
        index: u32,
        name: Option<String>,
    },
}

/// The rule and route that send marked packets into the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyRouting {
    pub fwmark: u32,
    pub fwmask: u32,
    pub table: u32,
    pub priority: u32,
}

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink route socket in the current network namespace. Needs a tokio runtime.
    pub fn connect() -> Result<Self, Error> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(Error::Connect)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn links(&self) -> Result<Vec<Link>, Error> {
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(req("list links"))?;
        Ok(msgs.iter().filter_map(Link::from_message).collect())
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>, Error> {
        let mut s = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Link::from_message(&m)),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::ENODEV => {
                Ok(None)
            }
            Err(e) => Err(req(format!("get link {name}"))(e)),
        }
    }

    /// Sets the link up and, if given, its MTU, only when they differ.
    pub async fn ensure_up(&self, name: &str, mtu: Option<u32>) -> Result<Link, Error> {
        let link = self
            .link(name)
            .await?
            .ok_or_else(|| Error::NoSuchLink(name.to_owned()))?;
        let want_mtu = mtu.filter(|m| *m != link.mtu);
        if link.up && want_mtu.is_none() {
            return Ok(link);
        }
        let mut b = LinkUnspec::new_with_index(link.index).up();
        if let Some(m) = want_mtu {
            b = b.mtu(m);
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(req(format!("set link {name} up")))?;
        Ok(Link {
            up: true,
            mtu: want_mtu.unwrap_or(link.mtu),
            ..link
        })
    }

    /// The name of the interface that holds `ip`.
    pub async fn interface_with_address(&self, ip: IpAddr) -> Result<Option<String>, Error> {
        let addrs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(req("list addresses"))?;
        let index = addrs.iter().find_map(|a| {
            a.attributes
                .iter()
                .any(|attr| matches!(attr, AddressAttribute::Address(x) | AddressAttribute::Local(x) if *x == ip))
                .then_some(a.header.index)
        });
        let Some(index) = index else { return Ok(None) };
        Ok(self
            .links()
            .await?
            .into_iter()
            .find(|l| l.index == index)
            .map(|l| l.name))
    }

    async fn rules(&self, v: IpVersion) -> Result<Vec<RuleMessage>, Error> {
        self.handle
            .rule()
            .get(v)
            .execute()
            .try_collect()
            .await
            .map_err(req("list rules"))
    }

    fn is_our_rule(r: &RuleMessage, p: &PolicyRouting) -> bool {
        let a = &r.attributes;
        a.contains(&RuleAttribute::FwMark(p.fwmark))
            && a.contains(&RuleAttribute::Priority(p.priority))
            && (a.contains(&RuleAttribute::Table(p.table)) || u32::from(r.header.table) == p.table)
    }

    /// Ensures `fwmark/fwmask lookup table` at `priority`, for IPv4 and (best effort) IPv6.
    pub async fn ensure_rules(&self, p: &PolicyRouting) -> Result<(), Error> {
        let rule = || {
            let mut add = self
                .handle
                .rule()
                .add()
                .fw_mark(p.fwmark)
                .priority(p.priority)
                .table_id(p.table)
                .action(RuleAction::ToTable);
            add.message_mut()
                .attributes
                .push(RuleAttribute::FwMask(p.fwmask));
            add
        };
        self.ensure_rule_pair(
            "fwmark rule",
            "IPv6 pod traffic will not be steered",
            |r| Self::is_our_rule(r, p),
            rule,
        )
        .await
    }

    pub async fn delete_rules(&self, p: &PolicyRouting) -> Result<usize, Error> {
        self.delete_matching_rules("fwmark rule", |r| Self::is_our_rule(r, p))
            .await
    }

    /// Adds the rule `add` builds, for IPv4 and IPv6, where no rule `ours` accepts exists. IPv6
    /// is best effort (a node may have it disabled): its failure is logged with `v6_impact`.
    async fn ensure_rule_pair(
        &self,
        what: &str,
        v6_impact: &str,
        ours: impl Fn(&RuleMessage) -> bool,
        add: impl Fn() -> rtnetlink::RuleAddRequest,
    ) -> Result<(), Error> {
        for v in [IpVersion::V4, IpVersion::V6] {
            if self.rules(v.clone()).await?.iter().any(&ours) {
                continue;
            }
            let r = match v {
                IpVersion::V4 => add().v4().execute().await,
                IpVersion::V6 => add().v6().execute().await,
            };
            match (r, v) {
                (Ok(()), _) => {}
                (Err(rtnetlink::Error::NetlinkError(e)), _)
                    if e.raw_code().abs() == libc::EEXIST => {}
                (Err(e), IpVersion::V6) => {
                    tracing::warn!(error = %e, "cannot add the IPv6 {what}; {v6_impact}")
                }
                (Err(e), IpVersion::V4) => return Err(req(format!("add {what}"))(e)),
            }
        }
        Ok(())
    }

    /// Deletes every rule (IPv4 and IPv6) `ours` accepts; returns how many.
    async fn delete_matching_rules(
        &self,
        what: &str,
        ours: impl Fn(&RuleMessage) -> bool,
    ) -> Result<usize, Error> {
        let mut n = 0;
        for v in [IpVersion::V4, IpVersion::V6] {
            for r in self.rules(v).await?.into_iter().filter(|r| ours(r)) {
                self.handle
                    .rule()
                    .del(r)
                    .execute()
                    .await
                    .map_err(req(format!("delete {what}")))?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn default_route_v4(table: u32, oif: u32) -> RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(table)
            .output_interface(oif)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Static)
            .build()
    }

    fn default_route_v6(table: u32, oif: u32) -> RouteMessage {
        RouteMessageBuilder::<Ipv6Addr>::new()
            .table_id(table)
            .output_interface(oif)
            .protocol(RouteProtocol::Static)
            .build()
    }

    /// Ensures `default dev <oif>` in `table` (IPv4, and IPv6 best effort). `replace` makes it
    /// idempotent and repoints it when the tunnel was recreated with a new index.
    pub async fn ensure_tunnel_routes(&self, table: u32, oif: u32) -> Result<(), Error> {
        self.handle
            .route()
            .add(Self::default_route_v4(table, oif))
            .replace()
            .execute()
            .await
            .map_err(req(format!("add default route to table {table}")))?;
        if let Err(e) = self
            .handle
            .route()
            .add(Self::default_route_v6(table, oif))
            .replace()
            .execute()
            .await
        {
            tracing::debug!(error = %e, table, "no IPv6 route into the tunnel (IPv6 disabled on it?)");
        }
        Ok(())
    }

    /// Deletes every route in `table` (the table is wgmesh's own).
    pub async fn flush_table(&self, table: u32) -> Result<usize, Error> {
        let routes = self.table_routes(table).await?;
        let n = routes.len();
        for r in routes {
            self.handle
                .route()
                .del(r)
                .execute()
                .await
                .map_err(req("delete route"))?;
        }
        Ok(n)
    }

    fn is_host_rule(r: &RuleMessage, table: u32, priority: u32) -> bool {
        let a = &r.attributes;
        a.contains(&RuleAttribute::Iifname(HOST_IIF.to_owned()))
            && a.contains(&RuleAttribute::Priority(priority))
            && (a.contains(&RuleAttribute::Table(table)) || u32::from(r.header.table) == table)
    }

    /// Ensures `iif lo lookup table` at `priority` (IPv4 and, best effort, IPv6): the node's own
    /// packets consult the host-encryption table, which routes peered pod CIDRs into the tunnel.
    /// A lookup that finds no route there falls through to the next rule.
    pub async fn ensure_host_rules(&self, table: u32, priority: u32) -> Result<(), Error> {
        let rule = || {
            self.handle
                .rule()
                .add()
                .input_interface(HOST_IIF)
                .priority(priority)
                .table_id(table)
                .action(RuleAction::ToTable)
        };
        self.ensure_rule_pair(
            "host-encryption rule",
            "IPv6 host traffic stays outside the tunnel",
            |r| Self::is_host_rule(r, table, priority),
            rule,
        )
        .await
    }

    pub async fn delete_host_rules(&self, table: u32, priority: u32) -> Result<usize, Error> {
        self.delete_matching_rules("host-encryption rule", |r| {
            Self::is_host_rule(r, table, priority)
        })
        .await
    }

    async fn table_routes(&self, table: u32) -> Result<Vec<RouteMessage>, Error> {
        let mut out = Vec::new();
        for v in [IpVersion::V4, IpVersion::V6] {
            let filter = match v {
                IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                    .table_id(table)
                    .build(),
                IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                    .table_id(table)
                    .build(),
            };
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(filter)
                .execute()
                .try_collect()
                .await
                .map_err(req("list routes"))?;
            out.extend(routes.into_iter().filter(|r| {
                r.attributes.contains(&RouteAttribute::Table(table))
                    || u32::from(r.header.table) == table
            }));
        }
        Ok(out)
    }

    /// Makes `table` hold `want`: one route per pod CIDR, `dev <oif> src <address>`. Adds and
    /// repoints first (`replace`), then, with `prune`, deletes what is no longer wanted. Returns
    /// (added or changed, deleted).
    pub async fn sync_host_routes(
        &self,
        table: u32,
        oif: u32,
        want: &BTreeMap<IpNet, IpAddr>,
        prune: bool,
    ) -> Result<(usize, usize), Error> {
        let mut have: BTreeMap<IpNet, (Option<IpAddr>, Option<u32>, RouteMessage)> =
            BTreeMap::new();
        for r in self.table_routes(table).await? {
            if let Some((dst, src, dev)) = host_route_of(&r) {
                have.insert(dst, (src, dev, r));
            }
        }
        let adds: Vec<(IpNet, IpAddr, RouteMessage)> = want
            .iter()
            .filter(|(dst, src)| {
                !have
                    .get(dst)
                    .is_some_and(|(s, d, _)| *s == Some(**src) && *d == Some(oif))
            })
            .filter_map(|(dst, src)| Some((*dst, *src, host_route(table, oif, dst, src)?)))
            .collect();
        let added = adds.len();
        // In flight together: at 5,000 peers one request at a time would wait out 5,000 round
        // trips through the netlink connection.
        futures::stream::iter(adds.into_iter().map(|(dst, src, msg)| {
            let handle = self.handle.clone();
            async move {
                handle
                    .route()
                    .add(msg)
                    .replace()
                    .execute()
                    .await
                    .map_err(req(format!("add host route {dst} src {src}")))
            }
        }))
        .buffer_unordered(NETLINK_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
        let dels: Vec<(IpNet, RouteMessage)> = have
            .into_iter()
            .filter(|(dst, _)| prune && !want.contains_key(dst))
            .map(|(dst, (_, _, msg))| (dst, msg))
            .collect();
        let deleted = futures::stream::iter(dels.into_iter().map(|(dst, msg)| {
            let handle = self.handle.clone();
            async move {
                match handle.route().del(msg).execute().await {
                    Ok(()) => Ok(1),
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::ESRCH => {
                        Ok(0)
                    }
                    Err(e) => Err(req(format!("delete host route {dst}"))(e)),
                }
            }
        }))
        .buffer_unordered(NETLINK_IN_FLIGHT)
        .try_fold(0usize, |n, d| async move { Ok(n + d) })
        .await?;
        Ok((added, deleted))
    }

    pub async fn delete_link(&self, name: &str) -> Result<bool, Error> {
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            // Gone in between: a userspace device's TUN disappears when its process exits.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::ENODEV => {
                Ok(false)
            }
            Err(e) => Err(req(format!("delete link {name}"))(e)),
        }
    }
}

/// Link add/change/remove notifications of the current network namespace.
pub fn link_events() -> Result<impl Stream<Item = LinkEvent>, Error> {
    let (conn, _handle, messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link]).map_err(Error::Connect)?;
    tokio::spawn(conn);
    Ok(messages.filter_map(|(msg, _)| async move {
        match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                Link::from_message(&l).map(LinkEvent::Changed)
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                Some(LinkEvent::Removed {
                    index: l.header.index,
                    name: Link::from_message(&l).map(|l| l.name),
                })
            }
            _ => None,
        }
    }))
}

/// Writes a sysctl of the current network namespace (`/proc/sys/net/...` is per netns) if it differs.
pub fn ensure_sysctl(path: &str, value: &str) -> Result<bool, Error> {
    let full = Path::new("/proc/sys").join(path);
    let err = |source| Error::Sysctl {
        path: path.to_owned(),
        source,
    };
    let current = std::fs::read_to_string(&full).map_err(err)?;
    if current.trim() == value {
        return Ok(false);
    }
    std::fs::write(&full, value).map_err(err)?;
    Ok(true)
}

/// The interface name policy routing gives the node's own packets.
const HOST_IIF: &str = "lo";
/// Route requests kept in flight on the netlink socket at once.
const NETLINK_IN_FLIGHT: usize = 64;

/// `<dst> dev <oif> src <src>` in `table`; `None` when the families differ.
fn host_route(table: u32, oif: u32, dst: &IpNet, src: &IpAddr) -> Option<RouteMessage> {
    Some(match (dst, src) {
        (IpNet::V4(d), IpAddr::V4(s)) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(d.network(), d.prefix_len())
            .pref_source(*s)
            .output_interface(oif)
            .table_id(table)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::Static)
            .build(),
        (IpNet::V6(d), IpAddr::V6(s)) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(d.network(), d.prefix_len())
            .pref_source(*s)
            .output_interface(oif)
            .table_id(table)
            .protocol(RouteProtocol::Static)
            .build(),
        _ => return None,
    })
}

/// (destination, preferred source, output interface) of a route, if it has a destination.
fn host_route_of(r: &RouteMessage) -> Option<(IpNet, Option<IpAddr>, Option<u32>)> {
    let addr = |a: &RouteAddress| match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    };
    let mut dst = None;
    let mut src = None;
    let mut oif = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = addr(d),
            RouteAttribute::PrefSource(s) => src = addr(s),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let net = IpNet::new(dst?, r.header.destination_prefix_length).ok()?;
    Some((net, src, oif))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the agent writes is what it reads back when it compares the table with the wanted
    /// routes (else every pass would rewrite them), and mixed families are refused.
    #[test]
    fn host_routes_read_back_as_written() {
        let cases = [
            ("198.18.2.0/24", "192.0.2.11"),
            ("2001:db8:2::/64", "2001:db8::11"),
            ("198.18.3.8/29", "192.0.2.11"),
        ];
        for (dst, src) in cases {
            let (dst, src): (IpNet, IpAddr) = (dst.parse().unwrap(), src.parse().unwrap());
            let msg = host_route(51821, 7, &dst, &src).expect("same family");
            assert_eq!(
                host_route_of(&msg),
                Some((dst, Some(src), Some(7))),
                "{dst}"
            );
            assert!(
                msg.attributes.contains(&RouteAttribute::Table(51821))
                    || u32::from(msg.header.table) == 51821
            );
        }
        let v6: IpNet = "2001:db8:2::/64".parse().unwrap();
        assert!(host_route(51821, 7, &v6, &"192.0.2.11".parse().unwrap()).is_none());
    }
}
