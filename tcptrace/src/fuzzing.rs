//! Entry points for `cargo fuzz` (`tcptrace/fuzz`): each feeds arbitrary
//! bytes to a reader of outside input and checks what it promises. Built
//! only with `--cfg fuzzing`, which cargo fuzz sets.
use std::{collections::HashMap, io::Cursor, time::UNIX_EPOCH};

use crate::{
    attribution::{
        ServiceMap,
        fuzzed::{
            parse_cgroup_path, parse_container_log_name, parse_pod_dir_name, parse_proc_cgroup,
        },
    },
    bpf::{
        decode::{DecodeError, Decoder, KernelNames},
        offsets::TcpStateNames,
    },
    node::firewall::{parse_iptables_save, parse_nft},
    tui::{App, Header, replay_into_app},
};

/// A ring-buffer record: a record of the right size decodes or names the
/// field it cannot; whatever decodes serializes.
pub fn decode(bytes: &[u8]) {
    let names = KernelNames {
        states: TcpStateNames::from_names([(1, "ESTABLISHED".to_string())]),
        drop_reasons: HashMap::from([(2, "NO_SOCKET".to_string())]),
        reset_reasons: HashMap::from([(2, "NO_SOCKET".to_string())]),
        hz: 250,
    };
    match Decoder::new(names, UNIX_EPOCH).decode(bytes) {
        Ok(ev) => {
            serde_json::to_string(&ev).expect("a decoded event serializes");
        }
        // Only input of another size is refused for its size.
        Err(DecodeError::Size(got, want)) => assert!(got == bytes.len() && got != want),
        Err(_) => {}
    }
}

/// An NDJSON stream replayed: every non-blank line is a record or counted
/// invalid.
pub fn replay(bytes: &[u8]) {
    let mut app = App::new(Header::default());
    let summary = replay_into_app(Cursor::new(bytes), &mut app).expect("reading memory");
    let lines = bytes
        .split(|&b| b == b'\n')
        .filter(|l| !l.trim_ascii().is_empty())
        .count() as u64;
    assert_eq!(summary.records + summary.invalid, lines);
}

/// `/proc/<pid>/cgroup`, cgroup paths and the kubelet's pod and log names.
pub fn cgroup(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    parse_proc_cgroup(&text);
    if let Some(owner) = parse_cgroup_path(&text) {
        assert!(text.contains("kubepods"), "{text:?} gave {owner:?}");
    }
    parse_pod_dir_name(&text);
    parse_container_log_name(&text);
}

/// kube-proxy's rules: `iptables-save`, `nft -j list ruleset` and the
/// firewall drop rules of both.
pub fn kube_proxy(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    ServiceMap::from_iptables_save(&text);
    let _ = ServiceMap::from_nft_json(&text);
    parse_iptables_save(&text);
    parse_nft(&text);
}

/// IPVS's virtual servers, `/proc/net/ip_vs`.
pub fn ipvs(bytes: &[u8]) {
    ServiceMap::from_ip_vs(&String::from_utf8_lossy(bytes));
}
