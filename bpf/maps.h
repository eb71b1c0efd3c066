/* maps.h: the datapath's maps; each is pinned by name so forwarding outlives the daemon. */
#pragma once
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "consts.h"
#include "structs.h"

/* Old address -> redirect to a peer (old host). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VMS);
	__type(key, __u32);
	__type(value, struct redirect);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} redirects SEC(".maps");

/* Tunnel packets accepted: (peer address, token) -> unused; (address, 0)
 * marks a peer's address (struct peer_key). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct peer_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} peers SEC(".maps");

/* Old address -> local VM (new host). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VMS);
	__type(key, __u32);
	__type(value, struct vm);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vms SEC(".maps");

/* New address -> old address (1:1 NAT). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VMS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nat SEC(".maps");

/* Guest 4-tuples of local VMs in use (reply side: the ports the guest
 * sees): NAT flows, and flows through the tunnel, live or in the guest's
 * TIME_WAIT. A VM's packet whose tuple is a NAT flow leaves from new_ip. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_FLOWS);
	__type(key, struct flow_key);
	__type(value, struct flow);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} flows SEC(".maps");

/* Flows by their client side (original tuple: the client's own port,
 * vm_ip the old address, via how it arrived) -> the port the guest sees for
 * the client (network order). Every NAT flow has one; a tunnel flow only
 * when its tuple met a NAT flow's and was translated. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_FLOWS);
	__type(key, struct flow_key);
	__type(value, __u16);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nat_ports SEC(".maps");

/* Per-address counters (old address), per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_VMS);
	__type(key, __u32);
	__type(value, struct counters);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} stats SEC(".maps");

/* A bridge the FIB routes out of -> the uplink port under it. Sending out of
 * the port itself keeps tunnelled packets GSO: a bridge device has no
 * encapsulation offloads, so GSO packets with an outer header sent to it are
 * segmented (and checksummed) in software, which cost the redirect five
 * sixths of its throughput in the lab. Set when the uplink program is
 * attached to a bridge port. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} egress_ports SEC(".maps");

/* A local VM's fragmented datagrams -> their ports (first fragment's). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);
	__type(key, struct frag_key);
	__type(value, struct frag_ports);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} frags SEC(".maps");

/* IPv6 (struct in6 keys): old address -> redirect (old host). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VMS);
	__type(key, struct in6);
	__type(value, struct redirect6);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} redirects6 SEC(".maps");

/* IPv6 old address -> local VM (new host). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VMS);
	__type(key, struct in6);
	__type(value, struct vm6);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} vms6 SEC(".maps");

/* IPv6 new address -> old address (NAT66, 1:1). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VMS);
	__type(key, struct in6);
	__type(value, struct in6);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nat6 SEC(".maps");

/* A VM's tap (ifindex) -> its old IPv6 address: the guest's neighbour
 * solicitations come from its link-local address, not old_ip6. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_VMS);
	__type(key, __u32);
	__type(value, struct in6);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} taps6 SEC(".maps");

/* IPv6 guest 4-tuples in use (as flows). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_FLOWS);
	__type(key, struct flow6_key);
	__type(value, struct flow);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} flows6 SEC(".maps");

/* IPv6 client side -> the port the guest sees (as nat_ports). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MAX_FLOWS);
	__type(key, struct flow6_key);
	__type(value, __u16);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} nat_ports6 SEC(".maps");
