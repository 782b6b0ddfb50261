#!/bin/bash
# kind-node: the node side of `cargo xtask kind-cluster`, run inside a node
# container (whose network namespace is the node's). Pods are network
# namespaces with a veth to the node, a kubelet cgroup as kind's kubelet
# makes it, a /var/log/pods entry and a pause process; Services are
# kube-proxy's iptables rules (and the lab's IPVS emulation) in the node.
#
# Cgroups as in a kind node (kubernetes-sigs/kind): the container has its
# own cgroup namespace (`--cgroupns=private`), systemd (PID 1) moves itself
# to /init.scope, the kubelet runs in kubelet.slice (images/base kubelet.service
# `Slice=kubelet.slice`) with `cgroupDriver: systemd` and `cgroupRoot:
# /kubelet` (pkg/cluster/internal/kubeadm/config.go), so pods are
# /kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-<qos>.slice/
# kubelet-kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope.
#
#   kind-node init INDEX            PID 1: mounts, then waits
#   kind-node pod NAME [NAMESPACE]  a pod; prints its address
#   kind-node exec POD CMD...       runs CMD in the pod (namespace, cgroup)
#   kind-node service NS/NAME:PORTNAME CLUSTER_IP PORT BACKEND_IP TARGET_PORT [NODEPORT]
#   kind-node filter RULE...        an iptables filter rule (-A CHAIN ...)
#   kind-node ipvs-nodeports BACKEND_IP TARGET_PORT PORT...
#   kind-node route CIDR VIA        a route to another node's pods
set -euo pipefail

STATE=/run/kind-node

cgroup_root() {
	if [ -f /sys/fs/cgroup/unified/cgroup.procs ]; then
		echo /sys/fs/cgroup/unified
	else
		echo /sys/fs/cgroup
	fi
}

# This node's cgroup: above PID 1's /init.scope ("" in its own namespace).
node_cgroup() {
	sed -n 's/^0:://p' /proc/1/cgroup | sed -e 's#/init\.scope$##' -e 's#^/$##'
}

reload_rules() {
	local nat filter
	nat="*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
"
	local rules='-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
'
	local i=0 comment cip port backend tport nodeport svc sep
	while read -r comment cip port backend tport nodeport; do
		i=$((i + 1))
		svc=$(printf 'KUBE-SVC-KIND%012d' "$i")
		sep=$(printf 'KUBE-SEP-KIND%012d' "$i")
		nat+=":$svc - [0:0]
:$sep - [0:0]
"
		rules+="-A KUBE-SERVICES -d $cip/32 -p tcp -m comment --comment \"$comment cluster IP\" -m tcp --dport $port -j $svc
-A $svc -m comment --comment \"$comment -> $backend:$tport\" -j $sep
-A $sep -p tcp -m comment --comment \"$comment\" -m tcp -j DNAT --to-destination $backend:$tport
"
		if [ "$nodeport" != "-" ]; then
			rules+="-A KUBE-NODEPORTS -p tcp -m comment --comment \"$comment\" -m tcp --dport $nodeport -j $svc
"
		fi
	done < <(cat "$STATE/services" 2>/dev/null)
	rules+='-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
'
	filter="*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
$(cat "$STATE/filter" 2>/dev/null || true)
COMMIT
"
	printf '%s%sCOMMIT\n%s' "$nat" "$rules" "$filter" | iptables-restore
}

cmd=${1:-}
shift || true
case "$cmd" in
init)
	# Docker mounts /proc/sys and the cgroup tree read-only; a node
	# writes both (sysctls, pod cgroups).
	mount -o remount,rw /proc/sys
	mount -o remount,rw /sys/fs/cgroup
	if [ -d /sys/fs/cgroup/memory ] && [ ! -f /sys/fs/cgroup/unified/cgroup.procs ]; then
		# cgroup v1 hybrid: the unified hierarchy names the pods.
		mkdir -p /sys/fs/cgroup/unified
		mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
	fi
	# As systemd does: PID 1 in /init.scope, the kubelet in kubelet.slice
	# (a stand-in process keeps its cgroup, as the kubelet would).
	root="$(cgroup_root)$(node_cgroup)"
	mkdir -p "$root/init.scope" "$root/kubelet.slice/kubelet.service"
	echo 1 >"$root/init.scope/cgroup.procs"
	setsid sh -c 'echo $$ >"$0/cgroup.procs" && exec sleep 86400' \
		"$root/kubelet.slice/kubelet.service" </dev/null >/dev/null 2>&1 &
	mkdir -p "$STATE" /run/netns /var/log/pods /var/log/containers
	echo "$1" >"$STATE/index"
	echo 0 >"$STATE/pods"
	sysctl -qw net.ipv4.ip_forward=1
	echo ready >"$STATE/ready"
	exec sleep 86400
	;;
pod)
	name=$1
	namespace=${2:-default}
	node=$(cat "$STATE/index")
	n=$(($(cat "$STATE/pods") + 1))
	echo "$n" >"$STATE/pods"
	# Node N's pods are 10.244.(16N+n).2, each behind its own /24.
	net=$((16 * node + n))
	ip netns add "$name"
	ip -n "$name" link set lo up
	ip link add "v-$name" type veth peer name eth0 netns "$name"
	ip addr add "10.244.$net.1/24" dev "v-$name"
	ip link set "v-$name" up
	ip -n "$name" addr add "10.244.$net.2/24" dev eth0
	ip -n "$name" link set eth0 up
	ip -n "$name" route add default via "10.244.$net.1"
	uid=$(cat /proc/sys/kernel/random/uuid)
	cid=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
	pods="$(cgroup_root)$(node_cgroup)/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice"
	dir="$pods/kubelet-kubepods-besteffort-pod${uid//-/_}.slice/cri-containerd-$cid.scope"
	mkdir -p "$dir"
	logs="/var/log/pods/${namespace}_${name}_${uid}/app"
	mkdir -p "$logs"
	: >"$logs/0.log"
	ln -s "$logs/0.log" "/var/log/containers/${name}_${namespace}_app-$cid.log"
	echo "$uid $cid $dir" >"$STATE/pod-$name"
	# The pause process keeps the pod's namespace and cgroup populated.
	setsid bash -c 'echo 0 >"$0/cgroup.procs" && exec ip netns exec "$1" sleep 86400' \
		"$dir" "$name" </dev/null >/dev/null 2>&1 &
	echo "10.244.$net.2"
	;;
exec)
	pod=$1
	shift
	read -r _ _ dir <"$STATE/pod-$pod"
	echo $$ >"$dir/cgroup.procs"
	exec ip netns exec "$pod" "$@"
	;;
service)
	echo "$1 $2 $3 $4 $5 ${6:--}" >>"$STATE/services"
	reload_rules
	;;
filter)
	echo "$*" >>"$STATE/filter"
	reload_rules
	;;
ipvs-nodeports)
	# IPVS schedules every SYN-bearing packet to a NodePort of a local
	# address to a backend: emulated statelessly before conntrack.
	backend=$1
	tport=$2
	shift 2
	ports=$(
		IFS=,
		echo "$*"
	)
	nft -f - <<EOF
table ip kind_node_ipvs {
  chain prerouting {
    type filter hook prerouting priority raw; policy accept;
    fib daddr type local tcp dport { $ports } tcp flags & syn == syn notrack ip daddr set $backend tcp dport set $tport
  }
}
EOF
	;;
route)
	ip route replace "$1" via "$2"
	;;
*)
	echo "kind-node: unknown command ${cmd:-(none)}; see the header of $0" >&2
	exit 2
	;;
esac
