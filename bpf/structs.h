/* structs.h: keys and values shared by the maps and the Go loader. */
#pragma once
#include <linux/types.h>

/* redirects: on the old host, packets for an old address go to a peer. */
struct redirect {
	__u32 peer;   /* tunnel endpoint (host B), network order */
	__u32 mode;   /* REDIRECT_OFF or REDIRECT_ON: switching is this one field */
	__u8 mac[6];  /* answered for the old address once on (the VM's MAC: neighbours' caches stay right) */
	__u8 pad[2];
	__u64 token;  /* the migration's tunnel token (peers) */
};

/* peers: tunnel packets accepted, by outer source and token. An entry with
 * token 0 marks the address as a peer's: a packet from it whose token
 * matches no entry is spoofed (dropped and counted). */
struct peer_key {
	__u32 addr;   /* network order */
	__u32 pad;
	__u64 token;  /* as on the wire */
};

/* vms: a VM this host delivers to, keyed by its (old) address. */
struct vm {
	__u32 new_ip;    /* address clients reach it at here; 0: none */
	__u32 gw_ip;     /* the guest's default gateway, impersonated on the tap */
	__u32 peer;      /* the old host: replies on pre-switch flows go back there; 0: none */
	__u32 ifindex;   /* the VM's tap */
	__u8 vm_mac[6];  /* the guest's MAC */
	__u8 gw_mac[6];  /* MAC answered for gw_ip (the old gateway's, so the guest's cache stays right) */
	__u8 pad[4];
	__u64 token;     /* the migration's tunnel token, for packets back to peer */
};

/* A flow of a local VM as a 5-tuple (conntrack's words: the guest side is
 * the reply tuple, the client side the original). Ports in network order;
 * ICMP echo: the id stands as the port of the side that sent the request,
 * the other port is 0. */
struct flow_key {
	__u32 vm_ip;     /* old address */
	__u32 remote_ip;
	__u16 vm_port;
	__u16 remote_port;
	__u8 proto;
	__u8 via;        /* nat_ports keys: VIA_NEW_IP or VIA_TUNNEL; flows keys: 0 */
	__u8 pad[2];
};

/* flows value: what host B knows of a guest 4-tuple. */
struct flow {
	__u64 last_ns;     /* last packet, either way (bpf_ktime_get_ns) */
	__u16 remote_port; /* the client's own port: differs from the key's when translated */
	__u8 nat;          /* 1: the flow uses new_ip; 0: old_ip, through the tunnel (its client port
	                    * translated too when it met a NAT flow's tuple) */
	__u8 closing;      /* a FIN or RST was seen: free TIME_WAIT_NS after last_ns */
	__u32 pad;
};

struct counters {
	__u64 c[C_MAX];
	__u64 last_ns; /* when this CPU last redirected a packet for the address (drain detection) */
};

/* frags: the ports of a VM's fragmented datagram, for its later fragments. */
struct frag_key {
	__u32 saddr, daddr;
	__u16 id;  /* IP id, network order */
	__u8 proto;
	__u8 pad;
};
struct frag_ports {
	__u16 sport, dport;
};

/* IPv6: a dual-stack VM's IPv6 side. Addresses as 16 bytes in network
 * order; counters go to the VM's IPv4 old address (stats_key), so one
 * entry in stats (and its drain signal) covers both families. */
struct in6 {
	__u32 a[4];
};

/* redirects6: on the old host, packets for an old IPv6 address go to a
 * peer (the tunnel stays IPv4 between the hosts). */
struct redirect6 {
	__u32 peer;      /* tunnel endpoint (host B), IPv4, network order */
	__u32 mode;      /* REDIRECT_OFF or REDIRECT_ON */
	__u8 mac[6];     /* answered for the old address in neighbour advertisements once on */
	__u8 pad[2];
	__u64 token;
	__u32 stats_key; /* the VM's IPv4 old address: its counters */
	__u32 pad2;
};

/* vms6: a VM this host delivers to, keyed by its old IPv6 address. */
struct vm6 {
	struct in6 new_ip; /* all zero: none */
	struct in6 gw_ip;  /* the guest's IPv6 gateway (link-local or global), advertised on the tap */
	__u32 peer;        /* the old host (IPv4); 0: none */
	__u32 ifindex;     /* the VM's tap */
	__u8 vm_mac[6];
	__u8 gw_mac[6];
	__u32 stats_key;   /* the VM's IPv4 old address: its counters */
	__u64 token;
};

/* A flow of a local VM's IPv6 side (as struct flow_key). */
struct flow6_key {
	struct in6 vm_ip;
	struct in6 remote_ip;
	__u16 vm_port;
	__u16 remote_port;
	__u8 proto;
	__u8 via;
	__u8 pad[2];
};
