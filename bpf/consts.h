/* consts.h: constants and tunables of the vmhop datapath. */
#pragma once

#define ETH_HLEN_ 14
#define IPV4_HLEN 20
#define ETH_P_IP_ 0x0800
#define ETH_P_ARP_ 0x0806
#define ETH_P_IPV6_ 0x86DD
#define IPV6_HLEN 40

/* Kernel 6.3+ uapi; Debian 12's 6.1 headers lack it. */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV6
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif

/* The WAN MTU the tunnel must fit in. */
#ifndef TUNNEL_MTU
#define TUNNEL_MTU 1500
#endif
/* The tunnel: UDP to TUNNEL_PORT (like Katran's GUE, variant 1), the
 * migration's 8-byte token, then the inner IPv4 packet. The token is
 * "L2" to adjust_room, so GSO segments carry it. */
#ifndef TUNNEL_PORT
#define TUNNEL_PORT 6080
#endif
#define UDP_HLEN 8
#define TOKEN_LEN 8
#define TUNNEL_OVERHEAD (IPV4_HLEN + UDP_HLEN + TOKEN_LEN)
#define TUNNEL_ENCAP_FLAGS \
	(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2(TOKEN_LEN))
/* Largest inner packet that fits the tunnel, and the MSS that fills it. */
#define TUNNEL_INNER_MTU (TUNNEL_MTU - TUNNEL_OVERHEAD)
#define TUNNEL_MSS (TUNNEL_INNER_MTU - IPV4_HLEN - 20)
/* The same for an inner IPv6 packet (the outer stays IPv4). */
#define TUNNEL_MSS6 (TUNNEL_INNER_MTU - IPV6_HLEN - 20)
/* A too-big packet without DF is sent as two fragments: the first carries
 * this much payload (a multiple of 8 that fits), the second the rest, at
 * most FRAG_TAIL_MAX bytes (a 1500-byte packet leaves less than that). */
#define FRAG1_BYTES (((TUNNEL_INNER_MTU - IPV4_HLEN) / 8) * 8)
#define FRAG_TAIL_MAX 64

#define MAX_TCP_OPTIONS 10
#define MAX_FLOWS 65536
#define MAX_VMS 256

/* How long a guest 4-tuple stays taken after its flow's last packet: a
 * flow that saw a FIN or RST for the guest's TIME_WAIT (Linux: 60 s, with
 * a margin); an open TCP flow, like conntrack's established timeout; UDP
 * and ICMP, like conntrack's UDP stream timeout. */
#ifndef TIME_WAIT_NS
#define TIME_WAIT_NS (65ULL * 1000000000ULL)
#endif
#ifndef TCP_IDLE_NS
#define TCP_IDLE_NS (5ULL * 24 * 3600 * 1000000000ULL)
#endif
#ifndef UDP_IDLE_NS
#define UDP_IDLE_NS (180ULL * 1000000000ULL)
#endif
/* Ports a clashing client port is translated to, and how many are tried
 * (netfilter's get_unique_tuple tries a range from a hashed offset). The
 * range sits below the common ephemeral ranges (Linux 32768-60999, others
 * 49152-65535), so a client's own later choice rarely meets one. */
#define NAT_PORT_MIN 1024
#define NAT_PORT_RANGE 31744
#define NAT_PORT_TRIES 16

/* flow_key.via in nat_ports: how the client reached the VM. */
#define VIA_NEW_IP 0
#define VIA_TUNNEL 1

/* redirect.mode */
#define REDIRECT_OFF 0
#define REDIRECT_ON 1

/* Counter slots of struct counters. */
enum counter {
	C_ENCAP_PKTS = 0,   /* packets for old_ip tunnelled to the peer */
	C_ENCAP_BYTES,      /* (each *_PKTS slot is followed by its *_BYTES slot where it has one) */
	C_DECAP_PKTS,       /* tunnel packets from a known peer, decapsulated */
	C_DECAP_BYTES,
	C_DELIVER_PKTS,     /* packets delivered to the VM's tap */
	C_DNAT_PKTS,        /* packets to new_ip rewritten to old_ip */
	C_SNAT_PKTS,        /* packets from the VM rewritten to new_ip */
	C_TUNNEL_BACK_PKTS, /* packets from the VM sent back through the tunnel */
	C_ARP_REPLIES,      /* ARP replies for the VM's old gateway */
	C_ICMP_TOO_BIG,     /* ICMP fragmentation-needed sent instead of a too-big packet */
	C_MSS_CLAMPED,      /* SYNs whose MSS was lowered to fit the tunnel */
	C_DROP_NO_ROUTE,    /* dropped: no route to the peer or the destination */
	C_DROP_UNKNOWN_VM,  /* dropped: decapsulated packet for no local VM */
	C_DROP_ERROR,       /* dropped: a helper failed (adjust_room, store_bytes) */
	C_DROP_TOO_BIG,     /* dropped: too big, and no ICMP could be sent or fragments made */
	C_NAT_PORT_XLATE,   /* new NAT flows whose client port was translated (guest 4-tuple taken) */
	C_DROP_CLASH,       /* dropped: no free guest 4-tuple (NAT), or a tunnel flow on a NAT flow's tuple */
	C_FRAGMENTED,       /* too big for the tunnel without DF: sent as two fragments */
	C_DROP_SPOOFED,     /* dropped: tunnel packet from a peer's address without a valid token (host-wide: stats[0]) */
	C_MAX,
};
