/* structs.h: keys and values shared by the maps and the Go loader. */
#pragma once
#include <linux/types.h>

/* redirects: on the old host, packets for an old address go to a peer. */
struct redirect {
	__u32 peer;   /* tunnel endpoint (host B), network order */
	__u32 mode;   /* REDIRECT_OFF or REDIRECT_ON: switching is this one field */
	__u8 mac[6];  /* answered for the old address once on (the VM's MAC: neighbours' caches stay right) */
	__u8 pad[2];
};

/* vms: a VM this host delivers to, keyed by its (old) address. */
struct vm {
	__u32 new_ip;    /* address clients reach it at here; 0: none */
	__u32 gw_ip;     /* the guest's default gateway, impersonated on the tap */
	__u32 peer;      /* the old host: replies on pre-switch flows go back there; 0: none */
	__u32 ifindex;   /* the VM's tap */
	__u8 vm_mac[6];  /* the guest's MAC */
	__u8 gw_mac[6];  /* MAC answered for gw_ip (the old gateway's, so the guest's cache stays right) */
};

/* flows: connections of a VM that use new_ip (NAT), learned from inbound
 * packets to new_ip and from the VM's SYNs. Everything else the VM sends
 * while it has a peer goes back through the tunnel. */
struct flow_key {
	__u32 vm_ip;     /* old address, network order */
	__u32 remote_ip;
	__u16 vm_port;   /* network order; ICMP: echo id */
	__u16 remote_port;
	__u8 proto;
	__u8 pad[3];
};

struct counters {
	__u64 c[C_MAX];
	__u64 last_ns; /* when this CPU last redirected a packet for the address (drain detection) */
};
