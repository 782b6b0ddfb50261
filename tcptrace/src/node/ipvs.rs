//! IPVS's timeouts, per network namespace, over its generic netlink family
//! (what `ipvsadm -L --timeout` reads and kube-proxy's `--ipvs-tcp-timeout`
//! sets: `IPVS_CMD_GET_CONFIG`). No kernel has a sysctl for them.
//! Constants from the kernel's include/uapi/linux/ip_vs.h and genetlink.h.
use std::{path::Path, sync::OnceLock};

use anyhow::{Context as _, Result, bail};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_GENERIC};

use super::netns;
use crate::model::facts::IpvsTimeouts;

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const IPVS_GENL_NAME: &[u8] = b"IPVS\0";
const IPVS_GENL_VERSION: u8 = 1;
const IPVS_CMD_GET_SERVICE: u8 = 4;
const IPVS_CMD_GET_CONFIG: u8 = 13;
const IPVS_CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const IPVS_CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const IPVS_CMD_ATTR_TIMEOUT_UDP: u16 = 6;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

/// The IPVS timeouts of the namespace behind `path`; None when IPVS is not
/// loaded (its netlink family is not registered).
pub fn read(path: &Path) -> Result<Option<IpvsTimeouts>> {
    netns::enter(path, "tcptrace-ipvs", read_here)?
}

/// The IPVS timeouts of the calling thread's namespace.
pub fn read_here() -> Result<Option<IpvsTimeouts>> {
    let mut socket = Socket::new(NETLINK_GENERIC).context("opening a generic netlink socket")?;
    socket
        .bind_auto()
        .context("binding a generic netlink socket")?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .context("connecting a generic netlink socket")?;
    let Some(family) = family(&socket)? else {
        return Ok(None);
    };
    let services = match request(
        &socket,
        family,
        NLM_F_REQUEST | NLM_F_DUMP,
        IPVS_CMD_GET_SERVICE,
        &[],
    )? {
        Reply::Messages(m) => u32::try_from(m.len()).unwrap_or(u32::MAX),
        Reply::Error(e) => bail!(
            "IPVS_CMD_GET_SERVICE: {}",
            std::io::Error::from_raw_os_error(e)
        ),
    };
    let config = match request(&socket, family, NLM_F_REQUEST, IPVS_CMD_GET_CONFIG, &[])? {
        Reply::Messages(m) => m.into_iter().next().unwrap_or_default(),
        Reply::Error(e) => bail!(
            "IPVS_CMD_GET_CONFIG: {}",
            std::io::Error::from_raw_os_error(e)
        ),
    };
    let u32_of = |kind| {
        find(&config, kind)
            .and_then(|v| Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?)))
            .unwrap_or(0)
    };
    Ok(Some(IpvsTimeouts {
        tcp_s: u32_of(IPVS_CMD_ATTR_TIMEOUT_TCP),
        tcp_fin_s: u32_of(IPVS_CMD_ATTR_TIMEOUT_TCP_FIN),
        udp_s: u32_of(IPVS_CMD_ATTR_TIMEOUT_UDP),
        services,
    }))
}

/// IPVS's generic netlink family id (global, not per namespace: resolved
/// once per process; reloading ip_vs under a running tcptrace leaves its
/// timeouts unread), or None while IPVS is not loaded.
fn family(socket: &Socket) -> Result<Option<u16>> {
    static FAMILY: OnceLock<u16> = OnceLock::new();
    if let Some(id) = FAMILY.get() {
        return Ok(Some(*id));
    }
    let reply = request(
        socket,
        GENL_ID_CTRL,
        NLM_F_REQUEST,
        CTRL_CMD_GETFAMILY,
        &attr(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME),
    )?;
    let id = match reply {
        Reply::Messages(m) => m
            .first()
            .and_then(|attrs| find(attrs, CTRL_ATTR_FAMILY_ID))
            .and_then(|v| Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?)))
            .context("the generic netlink controller named no IPVS family id")?,
        Reply::Error(libc::ENOENT) => return Ok(None),
        Reply::Error(e) => bail!(
            "resolving the IPVS netlink family: {}",
            std::io::Error::from_raw_os_error(e)
        ),
    };
    Ok(Some(*FAMILY.get_or_init(|| id)))
}

/// A netlink attribute: length, type, value padded to 4 bytes.
fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(len.next_multiple_of(4), 0);
    out
}

/// Attributes of one reply: (type, value).
type Attrs = Vec<(u16, Vec<u8>)>;

fn find(attrs: &Attrs, kind: u16) -> Option<&[u8]> {
    attrs
        .iter()
        .find(|(k, _)| *k & 0x3fff == kind)
        .map(|(_, v)| v.as_slice())
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// The attributes of each reply message.
    Messages(Vec<Attrs>),
    /// The kernel's error (a positive errno).
    Error(i32),
}

/// Most reply messages a request may take.
const MAX_REPLIES: usize = 65_536;

fn request(socket: &Socket, family: u16, flags: u16, cmd: u8, attrs: &[u8]) -> Result<Reply> {
    let len = NLMSG_HDRLEN + GENL_HDRLEN + attrs.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&u32::try_from(len)?.to_ne_bytes());
    msg.extend_from_slice(&family.to_ne_bytes());
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&[cmd, IPVS_GENL_VERSION, 0, 0]);
    msg.extend_from_slice(attrs);
    socket.send(&msg, 0).context("sending a netlink request")?;
    let dump = flags & NLM_F_DUMP != 0;
    let mut replies = Vec::new();
    loop {
        let (data, _) = socket.recv_from_full().context("reading a netlink reply")?;
        match parse(&data, &mut replies)? {
            Some(reply) => return Ok(reply),
            None if !dump && !replies.is_empty() => return Ok(Reply::Messages(replies)),
            None if replies.len() > MAX_REPLIES => bail!("more than {MAX_REPLIES} netlink replies"),
            None => {}
        }
    }
}

/// Adds the messages of one datagram to `replies`; Some when the request
/// is answered (done, or an error).
fn parse(mut data: &[u8], replies: &mut Vec<Attrs>) -> Result<Option<Reply>> {
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(data[..4].try_into()?) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into()?);
        if len < NLMSG_HDRLEN || len > data.len() {
            bail!(
                "a netlink message of {len} bytes in a datagram of {}",
                data.len()
            );
        }
        let body = &data[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_DONE => return Ok(Some(Reply::Messages(std::mem::take(replies)))),
            NLMSG_ERROR => {
                let code =
                    i32::from_ne_bytes(body.get(..4).context("a short netlink error")?.try_into()?);
                return Ok(Some(if code == 0 {
                    Reply::Messages(std::mem::take(replies))
                } else {
                    Reply::Error(-code)
                }));
            }
            _ => replies.push(parse_attrs(body.get(GENL_HDRLEN..).unwrap_or_default())),
        }
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    Ok(None)
}

fn parse_attrs(mut data: &[u8]) -> Attrs {
    let mut attrs = Vec::new();
    while data.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([data[0], data[1]]));
        let kind = u16::from_ne_bytes([data[2], data[3]]);
        if len < 4 || len > data.len() {
            break;
        }
        attrs.push((kind, data[4..len].to_vec()));
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    attrs
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply as the kernel writes it: netlink header, genl header, attrs.
    fn message(kind: u16, attrs: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + GENL_HDRLEN + attrs.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[IPVS_CMD_GET_CONFIG, 1, 0, 0]);
        m.extend_from_slice(attrs);
        m
    }

    #[test]
    fn parses_a_get_config_reply() {
        let attrs = [
            attr(IPVS_CMD_ATTR_TIMEOUT_TCP, &900u32.to_ne_bytes()),
            attr(IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, &120u32.to_ne_bytes()),
            attr(IPVS_CMD_ATTR_TIMEOUT_UDP, &300u32.to_ne_bytes()),
        ]
        .concat();
        let mut replies = Vec::new();
        assert_eq!(parse(&message(0x20, &attrs), &mut replies).unwrap(), None);
        assert_eq!(replies.len(), 1);
        assert_eq!(
            find(&replies[0], IPVS_CMD_ATTR_TIMEOUT_TCP),
            Some(&900u32.to_ne_bytes()[..])
        );
        assert_eq!(
            find(&replies[0], IPVS_CMD_ATTR_TIMEOUT_UDP),
            Some(&300u32.to_ne_bytes()[..])
        );
    }

    #[test]
    fn an_unknown_family_is_an_errno_and_a_dump_ends() {
        let mut err = message(NLMSG_ERROR, &[]);
        err.truncate(NLMSG_HDRLEN);
        err.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        err[..4].copy_from_slice(&((NLMSG_HDRLEN + 4) as u32).to_ne_bytes());
        let mut replies = Vec::new();
        assert_eq!(
            parse(&err, &mut replies).unwrap(),
            Some(Reply::Error(libc::ENOENT))
        );
        let dump = [
            message(0x20, &[]),
            message(0x20, &[]),
            message(NLMSG_DONE, &[]),
        ]
        .concat();
        match parse(&dump, &mut replies).unwrap() {
            Some(Reply::Messages(m)) => assert_eq!(m.len(), 2),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        assert_eq!(
            attr(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME),
            [9, 0, 2, 0, b'I', b'P', b'V', b'S', 0, 0, 0, 0]
        );
    }
}
