/* encap.h: the UDP tunnel with a per-migration token: encapsulation, decapsulation, ICMP "fragmentation needed". */
#pragma once
#include "helpers.h"

/* outer is a tunnel packet's outer header. */
struct outer {
	struct iphdr ip;
	struct udphdr udp;
	__u64 token;
} __attribute__((packed));

/* build_outer fills the outer header of a tunnel packet from src to dst
 * whose inner packet is inner_len bytes. The UDP source port spreads flows
 * (sport_hash, as Katran's GUE does for ECMP); the UDP checksum is 0
 * (RFC 768: none, as IPv4 tunnels do, RFC 6935). */
static __always_inline void build_outer(struct outer *o, __u32 src, __u32 dst, __u8 tos, __u16 inner_len,
					__u64 token, __u32 sport_hash)
{
	__builtin_memset(o, 0, sizeof(*o));
	o->ip.version = 4;
	o->ip.ihl = 5;
	o->ip.tos = tos;
	o->ip.tot_len = bpf_htons(inner_len + TUNNEL_OVERHEAD);
	o->ip.frag_off = bpf_htons(0x4000); /* DF: the tunnel never fragments */
	o->ip.ttl = 64;
	o->ip.protocol = IPPROTO_UDP;
	o->ip.saddr = src;
	o->ip.daddr = dst;
	o->ip.check = ipv4_csum(&o->ip);
	o->udp.source = bpf_htons(0xc000 | (sport_hash & 0x3fff));
	o->udp.dest = bpf_htons(TUNNEL_PORT);
	o->udp.len = bpf_htons(inner_len + UDP_HLEN + TOKEN_LEN);
	o->token = token;
}

/* icmp_too_big turns the packet into an ICMP "fragmentation needed" (type 3
 * code 4, next-hop MTU mtu) from src to the packet's sender, and sends it
 * back out of the interface it arrived on.
 * Precondition: parse_ipv4 accepted the packet and it is not GSO. */
static __always_inline int icmp_too_big(struct __sk_buff *skb, __u32 key, __u32 src, __u16 mtu)
{
	struct {
		struct iphdr ip;
		struct icmphdr icmp;
		struct iphdr orig;
		__u8 l4[8];
	} __attribute__((packed)) r;
	__u8 eth[12];
	__builtin_memset(&r, 0, sizeof(r));
	if (bpf_skb_load_bytes(skb, 0, eth, 12) || bpf_skb_load_bytes(skb, ETH_HLEN_, &r.orig, IPV4_HLEN) ||
	    bpf_skb_load_bytes(skb, L4_OFF, r.l4, 8))
		return drop(key, C_DROP_TOO_BIG);
	if (bpf_skb_change_tail(skb, ETH_HLEN_ + sizeof(r), 0))
		return drop(key, C_DROP_TOO_BIG);
	r.ip.version = 4;
	r.ip.ihl = 5;
	r.ip.tot_len = bpf_htons(sizeof(r));
	r.ip.ttl = 64;
	r.ip.protocol = IPPROTO_ICMP;
	r.ip.saddr = src;
	r.ip.daddr = r.orig.saddr;
	r.ip.check = ipv4_csum(&r.ip);
	r.icmp.type = ICMP_DEST_UNREACH;
	r.icmp.code = ICMP_FRAG_NEEDED;
	r.icmp.un.frag.mtu = bpf_htons(mtu);
	r.icmp.checksum = csum_fold(bpf_csum_diff(0, 0, (void *)&r.icmp, sizeof(r) - IPV4_HLEN, 0));
	/* Back where it came from: swap the Ethernet addresses. */
	if (bpf_skb_store_bytes(skb, 0, eth + 6, 6, 0) || bpf_skb_store_bytes(skb, 6, eth, 6, 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN_, &r, sizeof(r), 0))
		return drop(key, C_DROP_ERROR);
	count(key, C_ICMP_TOO_BIG, 1);
	return bpf_redirect(skb->ifindex, 0);
}

/* put_outer writes the outer header of a tunnel packet to peer in the
 * room encap made, sized for the packet as it is now. Returns 0 on
 * success. */
static __always_inline int put_outer(struct __sk_buff *skb, __u32 peer, __u64 token, __u8 tos)
{
	struct outer o;
	build_outer(&o, local_ip, peer, tos, skb->len - ETH_HLEN_ - TUNNEL_OVERHEAD, token, skb->hash);
	return bpf_skb_store_bytes(skb, ETH_HLEN_, &o, sizeof(o), 0);
}

/* encap makes room for the outer header and writes it. flags: the
 * adjust_room encapsulation flags (GSO and checksum offload metadata; 0 for
 * a plain packet that must stay trimmable, see encap_fragments). Without
 * FIXED_GSO the kernel lowers gso_size by the added header. Returns 0 on
 * success. */
static __always_inline int encap(struct __sk_buff *skb, __u32 peer, __u64 token, __u8 tos, __u64 flags)
{
	if (bpf_skb_adjust_room(skb, TUNNEL_OVERHEAD, BPF_ADJ_ROOM_MAC, flags))
		return -1;
	return put_outer(skb, peer, token, tos);
}

/* set_frag writes the inner IPv4 header's tot_len and fragment field
 * (offset in bytes, MF) and its checksum. Returns 0 on success. */
static __always_inline int set_frag(struct __sk_buff *skb, __u32 off, __u16 tot_len, __u16 frag_bytes, int mf)
{
	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)))
		return -1;
	ip.tot_len = bpf_htons(tot_len);
	ip.frag_off = bpf_htons((frag_bytes >> 3) | (mf ? 0x2000 : 0));
	ip.check = 0;
	ip.check = ipv4_csum(&ip);
	return bpf_skb_store_bytes(skb, off, &ip, sizeof(ip), 0);
}

/* encap_fragments tunnels a packet without DF that is too big for the
 * tunnel as two IP fragments of the inner packet (RFC 791; the receiver
 * reassembles, as it would after any router): the first with the first
 * FRAG1_BYTES of the payload, sent with bpf_clone_redirect, then the rest
 * (at most FRAG_TAIL_MAX bytes: the packet came over a 1500-byte link).
 * Bigger packets, or a next hop not resolved yet, are dropped and counted.
 * The outer header goes on without the encapsulation flags (skb_change_tail
 * refuses an skb marked encapsulated; a plain packet needs no offload
 * metadata). The L4 checksum must be complete: true of packets that came
 * in on a wire (a local sender's CHECKSUM_PARTIAL packet cannot be told
 * apart here). Precondition: parse_ipv4 accepted the packet, no GSO. */
static __always_inline int encap_fragments(struct __sk_buff *skb, struct pkt *p, __u32 key, __u32 peer, __u64 token)
{
	__u8 tail[FRAG_TAIL_MAX];
	__u32 tail_len = p->tot_len - IPV4_HLEN - FRAG1_BYTES;
	if (tail_len == 0 || tail_len > FRAG_TAIL_MAX)
		return drop(key, C_DROP_TOO_BIG);
	__u16 fo;
	if (bpf_skb_load_bytes(skb, ETH_HLEN_ + offsetof(struct iphdr, frag_off), &fo, 2) ||
	    bpf_skb_load_bytes(skb, L4_OFF + FRAG1_BYTES, tail, tail_len))
		return drop(key, C_DROP_ERROR);
	fo = bpf_ntohs(fo);
	__u16 off = (fo & 0x1fff) << 3;
	int mf = (fo & 0x2000) != 0;
	/* The first fragment. */
	if (bpf_skb_change_tail(skb, L4_OFF + FRAG1_BYTES, 0) ||
	    set_frag(skb, ETH_HLEN_, IPV4_HLEN + FRAG1_BYTES, off, 1) || encap(skb, peer, token, p->tos, 0))
		return drop(key, C_DROP_ERROR);
	__u32 ifindex;
	int rc = fib_out(skb, key, local_ip, peer, &ifindex);
	if (rc == FIB_NO_NEIGH)
		return drop(key, C_DROP_NO_ROUTE);
	if (rc)
		return TC_ACT_SHOT;
	if (bpf_clone_redirect(skb, ifindex, 0))
		return drop(key, C_DROP_ERROR);
	/* The second one, from the same skb. */
	__u32 inner = ETH_HLEN_ + TUNNEL_OVERHEAD;
	if (bpf_skb_change_tail(skb, inner + IPV4_HLEN + tail_len, 0) ||
	    bpf_skb_store_bytes(skb, inner + IPV4_HLEN, tail, tail_len, 0) ||
	    set_frag(skb, inner, IPV4_HLEN + tail_len, off + FRAG1_BYTES, mf) || put_outer(skb, peer, token, p->tos))
		return drop(key, C_DROP_ERROR);
	count(key, C_FRAGMENTED, 1);
	return bpf_redirect(ifindex, 0);
}

/* encap_to tunnels the packet to peer (with the migration's token) and
 * forwards it. A non-GSO packet too
 * big for the tunnel gets an ICMP "fragmentation needed" (from icmp_src)
 * instead when DF is set, and is sent as two fragments otherwise
 * (encap_fragments); GSO packets are encapsulated with gso_size lowered so
 * each segment fits. A SYN's MSS is clamped to fit. Precondition:
 * parse_ipv4 accepted the packet. */
static __always_inline int encap_to(struct __sk_buff *skb, struct pkt *p, __u32 key, __u32 peer, __u64 token,
				    __u32 icmp_src)
{
	if (skb->gso_size == 0 && p->tot_len > TUNNEL_INNER_MTU) {
		if (p->df)
			return icmp_too_big(skb, key, icmp_src, TUNNEL_INNER_MTU);
		return encap_fragments(skb, p, key, peer, token);
	}
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & TCP_FLAG_SYN_))
		clamp_mss(skb, key, L4_OFF, TUNNEL_MSS);
	if (encap(skb, peer, token, p->tos, TUNNEL_ENCAP_FLAGS))
		return drop(key, C_DROP_ERROR);
	return fib_redirect(skb, key, local_ip, peer);
}

/* decap strips the outer header of a tunnel packet. FIXED_GSO keeps
 * gso_size: without it, forwarded GSO segments would grow past the MTU. */
static __always_inline int decap(struct __sk_buff *skb)
{
	return bpf_skb_adjust_room(skb, -TUNNEL_OVERHEAD, BPF_ADJ_ROOM_MAC,
				   BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4);
}

/* tunnel_check decides on a UDP packet to this host's tunnel port (outer:
 * parsed): TUNNEL_OK if its (source, token) is a peer's for a migration;
 * TUNNEL_SPOOFED (counted) if the source is a peer's address but the
 * token is none of its migrations'; TUNNEL_NOT_OURS otherwise. */
#define TUNNEL_OK 0
#define TUNNEL_SPOOFED 1
#define TUNNEL_NOT_OURS 2
static __always_inline int tunnel_check(struct __sk_buff *skb, struct pkt *outer)
{
	struct peer_key k = {.addr = outer->saddr};
	if (bpf_skb_load_bytes(skb, L4_OFF + UDP_HLEN, &k.token, TOKEN_LEN))
		return TUNNEL_NOT_OURS;
	if (k.token && bpf_map_lookup_elem(&peers, &k))
		return TUNNEL_OK;
	k.token = 0;
	if (!bpf_map_lookup_elem(&peers, &k))
		return TUNNEL_NOT_OURS;
	count(0, C_DROP_SPOOFED, 1);
	return TUNNEL_SPOOFED;
}
