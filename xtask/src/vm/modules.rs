//! The kernel modules of the base image: the ones loaded at boot and the
//! netfilter directories, with their dependency closure read from the .ko
//! files' modinfo, plus modules.dep, modules.alias and the load order.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::image::{Image, merged};

/// Modules loaded at boot; a missing required one (neither built in nor
/// shipped) fails the image build.
pub(super) const REQUIRED_MODULES: &[&str] = &[
    "veth",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_tables",
    "nft_compat",
    "nft_ct",
    "x_tables",
    "xt_tcpudp",
    "xt_conntrack",
    "ip_tables",
    "iptable_filter",
];
/// Loaded at boot when the kernel ships them (kube-proxy style rules).
pub(super) const OPTIONAL_MODULES: &[&str] = &[
    "iptable_raw",
    "iptable_nat",
    "iptable_mangle",
    "nf_nat",
    "nft_chain_nat",
    "nft_reject_inet",
    "nft_reject_ipv4",
    "nft_masq",
    "nft_nat",
    "xt_CT",
    "xt_state",
    "xt_comment",
    "xt_multiport",
    "xt_mark",
    "xt_nat",
    "xt_MASQUERADE",
    "xt_addrtype",
    "ipt_REJECT",
    "ip6_tables",
    "ip6table_filter",
    "sch_netem",
    "ip_vs",
    "ip_vs_rr",
    // kube-proxy's IPVS proxier: its kube-ipvs0 dummy and ipsets.
    "dummy",
    "ip_set",
    "ip_set_hash_ip",
    "ip_set_hash_ipport",
    "ip_set_bitmap_port",
    "bridge",
    "br_netfilter",
    "inet_diag",
    "tcp_diag",
    "nft_fib",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_redir",
    "nft_limit",
    "nft_hash",
    "nft_numgen",
    "nft_log",
];
/// Module directories shipped whole (so the kernel can autoload by alias).
pub(super) const MODULE_DIRS: &[&str] = &[
    "kernel/net/netfilter",
    "kernel/net/ipv4/netfilter",
    "kernel/net/ipv6/netfilter",
];

/// A kernel module: its bytes (decompressed) and modinfo fields.
struct Module {
    data: Vec<u8>,
    depends: Vec<String>,
    aliases: Vec<String>,
}

fn module_name(file: &str) -> Option<String> {
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    Some(stem.replace('-', "_"))
}

fn read_module(path: &Path) -> Result<Module> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    let data = match tool {
        None => fs::read(path)?,
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("running {tool} -dc"))?;
            if !out.status.success() {
                bail!("{tool} -dc {name} failed");
            }
            out.stdout
        }
    };
    Ok(parse_module(data))
}

/// .modinfo is a list of NUL-terminated key=value strings.
fn parse_module(data: Vec<u8>) -> Module {
    let field = |key: &[u8]| -> Vec<String> {
        let mut values = Vec::new();
        for (i, w) in data.windows(key.len() + 1).enumerate() {
            if w[0] == 0 && &w[1..] == key {
                let start = i + 1 + key.len();
                let end = data[start..]
                    .iter()
                    .position(|&b| b == 0)
                    .map_or(data.len(), |p| start + p);
                values.push(String::from_utf8_lossy(&data[start..end]).into_owned());
            }
        }
        values
    };
    let depends = field(b"depends=")
        .first()
        .map(|d| {
            d.split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default();
    let aliases = field(b"alias=");
    Module {
        data,
        depends,
        aliases,
    }
}

/// Puts the modules of the kernel unpacked in `kdir` into the image, with
/// modules.dep, modules.alias and /etc/modules.load (the boot load order).
pub(super) fn add_modules(img: &mut Image, kdir: &Path, release: &str) -> Result<()> {
    let root = kdir.join("lib/modules").join(release);
    let builtin: BTreeSet<String> = fs::read_to_string(root.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next().and_then(module_name))
        .collect();
    // Every shipped module by name.
    let mut index: HashMap<String, PathBuf> = HashMap::new();
    let mut stack = vec![root.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(module_name)
            {
                index.insert(name, path);
            }
        }
    }
    let mut wanted: Vec<String> = Vec::new();
    for m in REQUIRED_MODULES {
        let m = m.replace('-', "_");
        if index.contains_key(&m) {
            wanted.push(m);
        } else if !builtin.contains(&m) {
            bail!("kernel {release} has module {m} neither built in nor shipped");
        }
    }
    for m in OPTIONAL_MODULES {
        let m = m.replace('-', "_");
        if index.contains_key(&m) {
            wanted.push(m);
        }
    }
    // Whole directories too, for autoloading; only `wanted` load at boot.
    let mut shipped: Vec<String> = index
        .iter()
        .filter(|(_, p)| {
            MODULE_DIRS
                .iter()
                .any(|d| p.parent().is_some_and(|parent| parent.ends_with(d)))
        })
        .map(|(n, _)| n.clone())
        .collect();
    shipped.sort();
    // Dependency closure; load order is post-order.
    let mut modules: BTreeMap<String, Module> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    fn visit(
        name: &str,
        index: &HashMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        modules: &mut BTreeMap<String, Module>,
        order: &mut Vec<String>,
        loading: bool,
    ) -> Result<()> {
        if modules.contains_key(name) {
            if loading && !order.iter().any(|o| o == name) {
                let deps = modules[name].depends.clone();
                for d in &deps {
                    visit(d, index, builtin, modules, order, true)?;
                }
                order.push(name.to_string());
            }
            return Ok(());
        }
        let Some(path) = index.get(name) else {
            if builtin.contains(name) {
                return Ok(());
            }
            bail!("module {name} not found");
        };
        let module = read_module(path)?;
        let deps = module.depends.clone();
        modules.insert(name.to_string(), module);
        for d in &deps {
            visit(d, index, builtin, modules, order, loading)?;
        }
        if loading {
            order.push(name.to_string());
        }
        Ok(())
    }
    for m in &wanted {
        visit(m, &index, &builtin, &mut modules, &mut order, true)?;
    }
    for m in &shipped {
        visit(m, &index, &builtin, &mut modules, &mut order, false)?;
    }
    let dir = format!("/lib/modules/{release}");
    let mut dep = String::new();
    let mut alias = String::new();
    for (name, m) in &modules {
        dep.push_str(&format!("{name}.ko:"));
        for d in &m.depends {
            if modules.contains_key(d) {
                dep.push_str(&format!(" {d}.ko"));
            }
        }
        dep.push('\n');
        for a in &m.aliases {
            alias.push_str(&format!("alias {a} {name}\n"));
        }
    }
    for (name, m) in modules {
        img.bytes(&merged(&format!("{dir}/{name}.ko")), m.data, 0o644);
    }
    img.bytes(
        &merged(&format!("{dir}/modules.dep")),
        dep.into_bytes(),
        0o644,
    );
    img.bytes(
        &merged(&format!("{dir}/modules.alias")),
        alias.into_bytes(),
        0o644,
    );
    for f in ["modules.builtin", "modules.order"] {
        let p = root.join(f);
        if p.exists() {
            img.file(&merged(&format!("{dir}/{f}")), &p, 0o644);
        }
    }
    img.bytes(
        "/etc/modules.load",
        format!("{}\n", order.join("\n")).into_bytes(),
        0o644,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_and_modinfo_are_read() {
        assert_eq!(module_name("nf-nat.ko.xz").as_deref(), Some("nf_nat"));
        assert_eq!(module_name("veth.ko").as_deref(), Some("veth"));
        assert_eq!(module_name("modules.dep"), None);
        let m = parse_module(
            b"\x7fELF\0alias=nf-ct-proto-6\0depends=nf_conntrack,nf-defrag-ipv4\0alias=ip6t_x\0"
                .to_vec(),
        );
        assert_eq!(m.depends, ["nf_conntrack", "nf_defrag_ipv4"]);
        assert_eq!(m.aliases, ["nf-ct-proto-6", "ip6t_x"]);
    }
}
