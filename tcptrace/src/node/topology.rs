//! Which namespace routes a namespace's traffic, from the kernel's own
//! topology: the interface of its IPv4 default route is a veth whose peer
//! lives in another namespace (IFLA_LINK names the peer's index there,
//! IFLA_LINK_NETNSID that namespace's id as seen from this one). CNIs give
//! every pod such a veth into its node's namespace, which routes and NATs
//! its traffic.
use std::{
    collections::HashMap,
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
    nsid::{NsidAttribute, NsidMessage},
    route::{RouteAttribute, RouteHeader, RouteMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::netns::{self, Namespace};

/// A namespace's links and default route, as far as they point elsewhere.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Links {
    /// Links with a peer in another namespace: (index, peer index).
    pub peered: Vec<(u32, u32)>,
    /// The default route's link, when it has a peer in another namespace:
    /// (index, peer index, the peer namespace's id as seen from here).
    pub default_peer: Option<(u32, u32, i32)>,
}

/// Each namespace's router (the namespace holding the peer of its default
/// route's veth), by inode. Namespaces that cannot be read are skipped.
pub fn routers(namespaces: &[Namespace]) -> HashMap<u32, u32> {
    let links: Vec<(&Namespace, Links)> = namespaces
        .iter()
        .filter_map(|ns| Some((ns, read_links(&ns.path).ok()?)))
        .collect();
    let mut found = HashMap::new();
    for (ns, l) in &links {
        let Some((index, peer_index, nsid)) = l.default_peer else {
            continue;
        };
        // Namespaces with the other end of that link (ifindexes are per
        // namespace, so several may): the id settles it.
        let candidates: Vec<(u32, PathBuf)> = links
            .iter()
            .filter(|(other, ol)| {
                other.inode != ns.inode && ol.peered.contains(&(peer_index, index))
            })
            .map(|(other, _)| (other.inode, other.path.clone()))
            .collect();
        if candidates.is_empty() {
            continue;
        }
        if let Ok(Some(router)) = with_nsid(&ns.path, nsid, candidates) {
            found.insert(ns.inode, router);
        }
    }
    found
}

/// The links of the namespace behind `path`.
pub fn read_links(path: &Path) -> Result<Links> {
    netns::enter(path, "tcptrace-links", links_here)?
}

/// Which of `candidates` the namespace behind `path` calls `nsid`.
fn with_nsid(path: &Path, nsid: i32, candidates: Vec<(u32, PathBuf)>) -> Result<Option<u32>> {
    netns::enter(path, "tcptrace-nsid", move || -> Result<Option<u32>> {
        let socket = open()?;
        for (inode, file) in candidates {
            let f = File::open(&file).with_context(|| format!("opening {}", file.display()))?;
            let mut msg = NsidMessage::default();
            msg.attributes
                .push(NsidAttribute::Fd(u32::try_from(f.as_raw_fd())?));
            let replies = request(&socket, RouteNetlinkMessage::GetNsId(msg), false)?;
            let id = replies.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewNsId(m) => m.attributes.iter().find_map(|a| match a {
                    NsidAttribute::Id(id) => Some(*id),
                    _ => None,
                }),
                _ => None,
            });
            if id == Some(nsid) {
                return Ok(Some(inode));
            }
        }
        Ok(None)
    })?
}

fn links_here() -> Result<Links> {
    let socket = open()?;
    let mut peers: HashMap<u32, (u32, Option<i32>)> = HashMap::new();
    for m in request(
        &socket,
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
        true,
    )? {
        let RouteNetlinkMessage::NewLink(link) = m else {
            continue;
        };
        let mut peer = None;
        let mut nsid = None;
        for a in &link.attributes {
            match a {
                LinkAttribute::Link(i) => peer = Some(*i),
                LinkAttribute::LinkNetNsId(id) => nsid = Some(*id),
                _ => {}
            }
        }
        if let (Some(peer), Some(_)) = (peer, nsid) {
            peers.insert(link.header.index, (peer, nsid));
        }
    }
    let mut route = RouteMessage::default();
    route.header.address_family = AddressFamily::Inet;
    let mut default_oif = None;
    for m in request(&socket, RouteNetlinkMessage::GetRoute(route), true)? {
        let RouteNetlinkMessage::NewRoute(r) = m else {
            continue;
        };
        if r.header.destination_prefix_length != 0 || r.header.table != RouteHeader::RT_TABLE_MAIN {
            continue;
        }
        default_oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if default_oif.is_some() {
            break;
        }
    }
    let mut peered: Vec<(u32, u32)> = peers.iter().map(|(i, (p, _))| (*i, *p)).collect();
    peered.sort_unstable();
    let default_peer = default_oif.and_then(|oif| {
        let (peer, nsid) = peers.get(&oif)?;
        Some((oif, *peer, (*nsid)?))
    });
    Ok(Links {
        peered,
        default_peer,
    })
}

fn open() -> Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
    socket.bind_auto().context("binding a netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting a netlink socket")?;
    Ok(socket)
}

/// Most replies a request may take (a dump of this many links or routes).
const MAX_REPLIES: usize = 65_536;

/// Sends one request and collects its replies (up to the dump's end).
fn request(
    socket: &Socket,
    msg: RouteNetlinkMessage,
    dump: bool,
) -> Result<Vec<RouteNetlinkMessage>> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0).context("sending a netlink request")?;
    let mut replies = Vec::new();
    loop {
        let (data, _) = socket.recv_from_full().context("reading a netlink reply")?;
        let mut offset = 0;
        while offset < data.len() {
            let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                .map_err(|e| anyhow!("decoding a netlink reply: {e}"))?;
            let len = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(replies),
                NetlinkPayload::Error(e) => match e.code {
                    None => return Ok(replies),
                    Some(code) => bail!(
                        "netlink: {}",
                        std::io::Error::from_raw_os_error(-code.get())
                    ),
                },
                NetlinkPayload::InnerMessage(m) => {
                    replies.push(m);
                    if !dump {
                        return Ok(replies);
                    }
                }
                _ => {}
            }
            if replies.len() > MAX_REPLIES {
                bail!("more than {MAX_REPLIES} netlink replies");
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
    }
}
