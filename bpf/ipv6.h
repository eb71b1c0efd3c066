/* ipv6.h: a dual-stack VM's IPv6 side: redirect through the (IPv4) tunnel,
 * NAT66 at the new host, ICMPv6 packet too big, neighbour discovery.
 *
 * It mirrors the IPv4 path: the old host tunnels packets for old_ip6 to
 * the peer; the new host delivers them to the tap, translates new_ip6 <->
 * old_ip6 (client port translated when the guest 4-tuple is taken), and
 * sends the VM's packets on flows it does not know as NAT flows back
 * through the tunnel. Only packets whose next header is TCP, UDP or
 * ICMPv6 are translated (no extension headers, so no fragments); any
 * IPv6 packet to a redirected old_ip6 is tunnelled. Counters go to the
 * VM's IPv4 old address (stats_key). */
#pragma once
#include "encap.h"
#include "nat.h"

#ifndef AF_INET6
#define AF_INET6 10
#endif
#define IPPROTO_ICMPV6_ 58
#define ICMP6_DEST_UNREACH 1
#define ICMP6_PKT_TOO_BIG 2
#define ICMP6_TIME_EXCEEDED 3
#define ICMP6_PARAMPROB 4
#define ICMP6_ECHO_REQUEST 128
#define ICMP6_ECHO_REPLY 129
#define NDP_NS 135
#define NDP_NA 136
#define L4_OFF6 (ETH_HLEN_ + IPV6_HLEN)

struct ip6hdr {
	__be32 vtc_flow; /* version 4 bits, traffic class 8, flow label 20 */
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	struct in6 saddr;
	struct in6 daddr;
};
_Static_assert(sizeof(struct ip6hdr) == IPV6_HLEN, "ip6hdr");

/* pkt6 is what the programs need to know of an IPv6 packet. */
struct pkt6 {
	struct in6 saddr, daddr;
	__u16 sport, dport;  /* network order; ICMPv6 echo: the id as the requester's port */
	__u16 payload_len;   /* host order */
	__u8 proto;          /* next header */
	__u8 tcp_flags;
	__u8 has_ports;
	__u8 icmp_type;      /* ICMPv6 type (proto ICMPv6 only) */
	__u8 tclass;
	__u8 pad;
};

static __always_inline int in6_zero(const struct in6 *a)
{
	return !(a->a[0] | a->a[1] | a->a[2] | a->a[3]);
}

static __always_inline int in6_eq(const struct in6 *a, const struct in6 *b)
{
	return !((a->a[0] ^ b->a[0]) | (a->a[1] ^ b->a[1]) | (a->a[2] ^ b->a[2]) | (a->a[3] ^ b->a[3]));
}

/* parse_ipv6 reads the IPv6 packet after the Ethernet header. Returns 1
 * for an IPv6 packet that is not truncated (not a jumbogram); ports and
 * flags only when the next header is TCP, UDP or ICMPv6 echo. Returns 0
 * for anything else. */
static __always_inline int parse_ipv6(struct __sk_buff *skb, struct pkt6 *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IPV6_))
		return 0;
	struct ip6hdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return 0;
	__u32 vtc = bpf_ntohl(ip->vtc_flow);
	if ((vtc >> 28) != 6)
		return 0;
	__u16 plen = bpf_ntohs(ip->payload_len);
	if (plen == 0 || (skb->gso_size == 0 && skb->len < L4_OFF6 + (__u32)plen))
		return 0;
	__builtin_memcpy(&p->saddr, &ip->saddr, 16);
	__builtin_memcpy(&p->daddr, &ip->daddr, 16);
	p->payload_len = plen;
	p->proto = ip->nexthdr;
	p->tclass = (vtc >> 20) & 0xff;
	p->has_ports = 0;
	p->tcp_flags = 0;
	p->icmp_type = 0;
	p->sport = 0;
	p->dport = 0;
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP) {
		if (!parse_ports(ip + 1, data_end, p->proto, &p->sport, &p->dport, &p->tcp_flags))
			return 0;
		p->has_ports = 1;
	} else if (p->proto == IPPROTO_ICMPV6_) {
		struct icmphdr *ih = (void *)(ip + 1); /* type, code, checksum, id, sequence: the same layout */
		if ((void *)(ih + 1) > data_end)
			return 0;
		p->icmp_type = ih->type;
		if (ih->type == ICMP6_ECHO_REQUEST) {
			p->sport = ih->un.echo.id;
			p->has_ports = 1;
		} else if (ih->type == ICMP6_ECHO_REPLY) {
			p->dport = ih->un.echo.id;
			p->has_ports = 1;
		}
	}
	return 1;
}

/* l4_csum_off6 is the offset of p's L4 checksum, or 0 if the packet has
 * none the NAT can fix (extension headers). */
static __always_inline __u32 l4_csum_off6(const struct pkt6 *p)
{
	if (p->proto == IPPROTO_TCP)
		return L4_OFF6 + offsetof(struct tcphdr, check);
	if (p->proto == IPPROTO_UDP)
		return L4_OFF6 + offsetof(struct udphdr, check);
	if (p->proto == IPPROTO_ICMPV6_)
		return L4_OFF6 + offsetof(struct icmphdr, checksum);
	return 0;
}

/* rewrite_addr6 replaces p's source (is_src) or destination address and
 * fixes the L4 checksum (TCP, UDP and ICMPv6 all sum the pseudo-header;
 * IPv6 has no header checksum). Returns 0 on success, -1 for a packet
 * whose checksum cannot be fixed (extension headers). */
static __always_inline int rewrite_addr6(struct __sk_buff *skb, struct pkt6 *p, int is_src, const struct in6 *to)
{
	struct in6 from = is_src ? p->saddr : p->daddr;
	__u32 csum_off = l4_csum_off6(p);
	if (!csum_off)
		return -1;
	__s64 diff = bpf_csum_diff(from.a, 16, (__be32 *)to->a, 16, 0);
	__u64 flags = BPF_F_PSEUDO_HDR | (p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
	if (diff < 0 || bpf_l4_csum_replace(skb, csum_off, 0, diff, flags))
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN_ + (is_src ? 8 : 24), to, 16, 0))
		return -1;
	if (is_src)
		p->saddr = *to;
	else
		p->daddr = *to;
	return 0;
}

/* rewrite_port6 replaces p's source (is_src) or destination port (ICMPv6
 * echo: the id) with to, fixing the L4 checksum. Returns 0 on success. */
static __always_inline int rewrite_port6(struct __sk_buff *skb, struct pkt6 *p, int is_src, __u16 to)
{
	__u16 from = is_src ? p->sport : p->dport;
	__u32 off = L4_OFF6 + (is_src ? 0 : 2), flags = sizeof(to);
	__u32 csum_off = l4_csum_off6(p);
	if (from == to)
		return 0;
	if (p->proto == IPPROTO_UDP)
		flags |= BPF_F_MARK_MANGLED_0;
	else if (p->proto == IPPROTO_ICMPV6_)
		off = L4_OFF6 + offsetof(struct icmphdr, un.echo.id);
	if (!csum_off || bpf_l4_csum_replace(skb, csum_off, from, to, flags) || bpf_skb_store_bytes(skb, off, &to, sizeof(to), 0))
		return -1;
	if (is_src)
		p->sport = to;
	else
		p->dport = to;
	return 0;
}

/* fib_redirect6 is fib_redirect for IPv6 (src -> dst). */
static __always_inline int fib_redirect6(struct __sk_buff *skb, __u32 key, const struct in6 *src, const struct in6 *dst)
{
	struct bpf_fib_lookup p = {.family = AF_INET6};
	__builtin_memcpy(p.ipv6_src, src, 16);
	__builtin_memcpy(p.ipv6_dst, dst, 16);
	__u32 ifindex;
	return fib_send(fib_lookup_out(skb, key, &p, &ifindex), ifindex);
}

/* csum6 is the ICMPv6 checksum of msg (len bytes, a multiple of 4, its
 * checksum field zero) from src to dst (RFC 4443 §2.3: the pseudo-header
 * of RFC 8200 §8.1). */
static __always_inline __u16 csum6(const struct in6 *src, const struct in6 *dst, void *msg, __u32 len)
{
	struct {
		struct in6 src, dst;
		__be32 len;
		__be32 nh;
	} ph = {.src = *src, .dst = *dst, .len = bpf_htonl(len), .nh = bpf_htonl(IPPROTO_ICMPV6_)};
	__s64 s = bpf_csum_diff(0, 0, (__be32 *)&ph, sizeof(ph), 0);
	s = bpf_csum_diff(0, 0, msg, len, (__wsum)s);
	return csum_fold((__u32)s);
}

/* An ICMPv6 error's quoted packet: its IPv6 header and first 8 bytes. */
struct icmp6_quote {
	struct ip6hdr ip;
	__u8 l4[8];
};
_Static_assert(sizeof(struct icmp6_quote) == 48, "icmp6_quote");

#define QUOTE_OFF6 (L4_OFF6 + 8)

/* icmp6_too_big turns the packet into an ICMPv6 packet too big (RFC 4443
 * §3.2, MTU mtu) from src to the packet's sender, quoting its IPv6 header
 * and first 8 bytes (what a receiver needs to find its socket), and sends
 * it back out of the interface it arrived on. Precondition: parse_ipv6
 * accepted the packet and it is not GSO. */
static __always_inline int icmp6_too_big(struct __sk_buff *skb, __u32 key, const struct in6 *src, __u32 mtu)
{
	struct {
		struct ip6hdr ip;
		__u8 type, code;
		__u16 csum;
		__be32 mtu;
		struct icmp6_quote q;
	} r;
	_Static_assert(sizeof(r) == IPV6_HLEN + 8 + 48, "too big");
	__u8 eth[12];
	__builtin_memset(&r, 0, sizeof(r));
	if (bpf_skb_load_bytes(skb, 0, eth, 12) || bpf_skb_load_bytes(skb, ETH_HLEN_, &r.q, sizeof(r.q)))
		return drop(key, C_DROP_TOO_BIG);
	if (bpf_skb_change_tail(skb, ETH_HLEN_ + sizeof(r), 0))
		return drop(key, C_DROP_TOO_BIG);
	__u32 len = sizeof(r) - IPV6_HLEN;
	r.ip.vtc_flow = bpf_htonl(6 << 28);
	r.ip.payload_len = bpf_htons(len);
	r.ip.nexthdr = IPPROTO_ICMPV6_;
	r.ip.hop_limit = 64;
	r.ip.saddr = *src;
	r.ip.daddr = r.q.ip.saddr;
	r.type = ICMP6_PKT_TOO_BIG;
	r.mtu = bpf_htonl(mtu);
	r.csum = csum6(&r.ip.saddr, &r.ip.daddr, &r.type, len);
	if (bpf_skb_store_bytes(skb, 0, eth + 6, 6, 0) || bpf_skb_store_bytes(skb, 6, eth, 6, 0) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN_, &r, sizeof(r), 0))
		return drop(key, C_DROP_ERROR);
	count(key, C_ICMP_TOO_BIG, 1);
	return bpf_redirect(skb->ifindex, 0);
}

/* encap6_to tunnels an IPv6 packet to peer inside the IPv4 tunnel and
 * forwards it. A non-GSO packet too big for the tunnel gets an ICMPv6
 * packet too big from icmp_src (IPv6 routers never fragment); GSO packets
 * are encapsulated with gso_size lowered. A SYN's MSS is clamped to fit.
 * Precondition: parse_ipv6 accepted the packet. */
static __always_inline int encap6_to(struct __sk_buff *skb, struct pkt6 *p, __u32 key, __u32 peer, __u64 token,
				     const struct in6 *icmp_src)
{
	if (skb->gso_size == 0 && IPV6_HLEN + (__u32)p->payload_len > TUNNEL_INNER_MTU)
		return icmp6_too_big(skb, key, icmp_src, TUNNEL_INNER_MTU);
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & TCP_FLAG_SYN_))
		clamp_mss(skb, key, L4_OFF6, TUNNEL_MSS6);
	/* adjust_room switches skb->protocol to the outer IPv4; the frame's
	 * EtherType is ours to write. */
	__be16 proto = bpf_htons(ETH_P_IP_);
	if (encap(skb, peer, token, p->tclass, TUNNEL_ENCAP_FLAGS) || bpf_skb_store_bytes(skb, 12, &proto, 2, 0))
		return drop(key, C_DROP_ERROR);
	return fib_redirect(skb, key, local_ip, peer);
}

/* deliver6 sends a packet for a local VM into its tap. */
static __always_inline int deliver6(struct __sk_buff *skb, struct vm6 *v, __u32 key)
{
	if (set_macs(skb, v->vm_mac, v->gw_mac))
		return drop(key, C_DROP_ERROR);
	count(key, C_DELIVER_PKTS, 1);
	return bpf_redirect(v->ifindex, 0);
}

static __always_inline void guest_key6(struct flow6_key *k, const struct pkt6 *p, const struct in6 *vm_ip, int from_vm)
{
	k->vm_ip = *vm_ip;
	k->proto = p->proto;
	k->remote_ip = from_vm ? p->daddr : p->saddr;
	k->vm_port = from_vm ? p->sport : p->dport;
	k->remote_port = from_vm ? p->dport : p->sport;
}

/* new_flow6 is new_flow for IPv6 (flows6, nat_ports6). */
static __always_inline __u16 new_flow6(struct flow6_key *ck, const struct pkt6 *p, __u32 key, __u64 now)
{
	__u8 nat = ck->via == VIA_NEW_IP;
	struct flow6_key gk = *ck;
	gk.via = 0;
	__u16 port = ck->remote_port;
	__u32 h = ck->remote_ip.a[3] ^ ck->remote_ip.a[1] ^ ((__u32)ck->remote_port << 16 | ck->vm_port) ^ (__u32)now;
	for (int i = 0; i <= NAT_PORT_TRIES; i++) {
		if (i > 0)
			port = bpf_htons(NAT_PORT_MIN + (h + i * 7919) % NAT_PORT_RANGE);
		gk.remote_port = port;
		struct flow *f = bpf_map_lookup_elem(&flows6, &gk);
		if (!f || (f->nat == nat && f->remote_port == ck->remote_port) || flow_expired(f, gk.proto, now)) {
			struct flow n = {.last_ns = now, .remote_port = ck->remote_port, .nat = nat, .closing = tcp_closes(p->proto, p->tcp_flags)};
			if (bpf_map_update_elem(&flows6, &gk, &n, BPF_ANY) || bpf_map_update_elem(&nat_ports6, ck, &port, BPF_ANY))
				return 0;
			if (i > 0)
				count(key, C_NAT_PORT_XLATE, 1);
			return port;
		}
	}
	return 0;
}

/* track_tunnel_flow6 is track_tunnel_flow for IPv6. */
static __always_inline int track_tunnel_flow6(struct __sk_buff *skb, struct pkt6 *p, __u32 key)
{
	struct flow6_key k = {};
	__u64 now = bpf_ktime_get_ns();
	guest_key6(&k, p, &p->daddr, 0);
	struct flow *f = bpf_map_lookup_elem(&flows6, &k);
	if (f && !f->nat && f->remote_port == p->sport) {
		flow_touch(f, tcp_closes(p->proto, p->tcp_flags), now);
		return 0;
	}
	if (!f) {
		struct flow n = {.last_ns = now, .remote_port = p->sport, .closing = tcp_closes(p->proto, p->tcp_flags)};
		bpf_map_update_elem(&flows6, &k, &n, BPF_NOEXIST);
		return 0;
	}
	k.via = VIA_TUNNEL;
	__u16 *gp = bpf_map_lookup_elem(&nat_ports6, &k);
	__u16 port = gp ? *gp : new_flow6(&k, p, key, now);
	if (!port || rewrite_port6(skb, p, 1, port))
		return drop(key, C_DROP_CLASH);
	return 0;
}

static __always_inline int is_icmp6_error(const struct pkt6 *p)
{
	return p->proto == IPPROTO_ICMPV6_ && p->icmp_type >= ICMP6_DEST_UNREACH && p->icmp_type <= ICMP6_PARAMPROB;
}

/* load_quote6 reads the quoted packet of ICMPv6 error p and its ports (as
 * load_quote). Returns 0 if the quote is an IPv6 header and 8 bytes. */
static __always_inline int load_quote6(struct __sk_buff *skb, struct icmp6_quote *q, __u16 *sport, __u16 *dport)
{
	if (bpf_skb_load_bytes(skb, QUOTE_OFF6, q, sizeof(*q)) || (bpf_ntohl(q->ip.vtc_flow) >> 28) != 6)
		return -1;
	quote_ports(q->ip.nexthdr, q->l4, IPPROTO_ICMPV6_, ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY, sport, dport);
	return 0;
}

/* xlate_quote6 rewrites the quoted packet q of an ICMPv6 error: its source
 * (addr_is_src) or destination address to addr, and the TCP/UDP port on
 * the other side to port. It fixes a quoted UDP checksum and the ICMPv6
 * checksum (the outer addresses are the caller's: rewrite_addr6). */
static __always_inline int xlate_quote6(struct __sk_buff *skb, struct icmp6_quote *q, int addr_is_src, const struct in6 *addr,
					__u16 port)
{
	struct icmp6_quote n = *q;
	struct in6 from = addr_is_src ? q->ip.saddr : q->ip.daddr;
	if (addr_is_src)
		n.ip.saddr = *addr;
	else
		n.ip.daddr = *addr;
	if (q->ip.nexthdr == IPPROTO_TCP || q->ip.nexthdr == IPPROTO_UDP)
		__builtin_memcpy(&n.l4[addr_is_src ? 2 : 0], &port, 2);
	if (q->ip.nexthdr == IPPROTO_UDP)
		quote_udp_csum(bpf_csum_diff(from.a, 16, (__be32 *)addr->a, 16, 0), q->l4, n.l4);
	__s64 diff = bpf_csum_diff((__be32 *)q, sizeof(*q), (__be32 *)&n, sizeof(n), 0);
	if (diff < 0 || bpf_l4_csum_replace(skb, L4_OFF6 + 2, 0, diff, 0) || bpf_skb_store_bytes(skb, QUOTE_OFF6, &n, sizeof(n), 0))
		return -1;
	return 0;
}

/* An NDP message as the programs read and write it: solicitation or
 * advertisement, one link-layer address option (RFC 4861 §4.3, §4.4). */
struct ndp_msg {
	struct ip6hdr ip;
	__u8 type, code;
	__u16 csum;
	__be32 flags; /* NA: router, solicited, override */
	struct in6 target;
	__u8 opt_type, opt_len;
	__u8 mac[6];
};
_Static_assert(sizeof(struct ndp_msg) == IPV6_HLEN + 32, "ndp_msg");

#define NA_ROUTER 0x80000000
#define NA_SOLICITED 0x40000000
#define NA_OVERRIDE 0x20000000

/* load_ns reads a neighbour solicitation with a specified source (not
 * duplicate address detection). Returns 1 if it is one. */
static __always_inline int load_ns(struct __sk_buff *skb, const struct pkt6 *p, struct ndp_msg *m)
{
	if (p->proto != IPPROTO_ICMPV6_ || p->icmp_type != NDP_NS || in6_zero(&p->saddr))
		return 0;
	__builtin_memset(m, 0, sizeof(*m));
	if (bpf_skb_load_bytes(skb, ETH_HLEN_, m, offsetof(struct ndp_msg, opt_type)))
		return 0;
	return m->code == 0 && m->ip.hop_limit == 255;
}

/* ndp_answer turns the solicitation m into an advertisement of its target
 * at mac (solicited, override; router if router), sent back out of the
 * interface it came in on. */
static __always_inline int ndp_answer(struct __sk_buff *skb, struct ndp_msg *m, const __u8 *mac, int router, __u32 key)
{
	__u8 eth_src[6];
	if (bpf_skb_load_bytes(skb, 6, eth_src, 6))
		return TC_ACT_OK;
	struct ndp_msg r = {};
	__u32 len = sizeof(r) - IPV6_HLEN;
	r.ip.vtc_flow = bpf_htonl(6 << 28);
	r.ip.payload_len = bpf_htons(len);
	r.ip.nexthdr = IPPROTO_ICMPV6_;
	r.ip.hop_limit = 255;
	r.ip.saddr = m->target;
	r.ip.daddr = m->ip.saddr;
	r.type = NDP_NA;
	r.flags = bpf_htonl(NA_SOLICITED | NA_OVERRIDE | (router ? NA_ROUTER : 0));
	r.target = m->target;
	r.opt_type = 2; /* target link-layer address */
	r.opt_len = 1;
	__builtin_memcpy(r.mac, mac, 6);
	r.csum = csum6(&r.ip.saddr, &r.ip.daddr, &r.type, len);
	if (bpf_skb_change_tail(skb, ETH_HLEN_ + sizeof(r), 0) || set_macs(skb, eth_src, mac) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN_, &r, sizeof(r), 0))
		return drop(key, C_DROP_ERROR);
	count(key, C_ARP_REPLIES, 1);
	return bpf_redirect(skb->ifindex, 0);
}

/* uplink_ndp answers, on the uplink, solicitations for an old IPv6 address
 * whose redirect is on (with the VM's MAC) and for a new IPv6 address of a
 * local VM. */
static __always_inline int uplink_ndp(struct __sk_buff *skb, struct pkt6 *p)
{
	struct ndp_msg m;
	if (!load_ns(skb, p, &m))
		return TC_ACT_OK;
	struct redirect6 *r = bpf_map_lookup_elem(&redirects6, &m.target);
	if (r && r->mode == REDIRECT_ON)
		return ndp_answer(skb, &m, r->mac, 0, r->stats_key);
	struct in6 *old = bpf_map_lookup_elem(&nat6, &m.target);
	if (old) {
		struct in6 o = *old;
		struct vm6 *v = bpf_map_lookup_elem(&vms6, &o);
		if (v)
			return ndp_answer(skb, &m, v->vm_mac, 0, v->stats_key);
	}
	return TC_ACT_OK;
}

/* from_peer6 handles a decapsulated IPv6 packet (len: the tunnel packet's
 * length): into a local VM, or, on the old host, on to the client. */
static __always_inline int from_peer6(struct __sk_buff *skb, __u32 len)
{
	struct pkt6 p;
	if (!parse_ipv6(skb, &p))
		return TC_ACT_SHOT;
	struct vm6 *v = bpf_map_lookup_elem(&vms6, &p.daddr);
	if (v) {
		__u32 key = v->stats_key;
		count_pkt(key, C_DECAP_PKTS, len, 0);
		if (p.has_ports && track_tunnel_flow6(skb, &p, key))
			return TC_ACT_SHOT;
		return deliver6(skb, v, key);
	}
	struct redirect6 *r = bpf_map_lookup_elem(&redirects6, &p.saddr);
	__u32 key = r ? r->stats_key : 0;
	count_pkt(key, C_DECAP_PKTS, len, 0);
	return fib_redirect6(skb, key, &p.saddr, &p.daddr);
}

/* uplink6 is uplink_ingress for IPv6 packets. */
static __always_inline int uplink6(struct __sk_buff *skb)
{
	struct pkt6 p;
	if (!parse_ipv6(skb, &p))
		return TC_ACT_OK;
	if (p.proto == IPPROTO_ICMPV6_ && p.icmp_type == NDP_NS)
		return uplink_ndp(skb, &p);
	struct redirect6 *r = bpf_map_lookup_elem(&redirects6, &p.daddr);
	if (r && r->mode == REDIRECT_ON) {
		__u32 key = r->stats_key;
		count_pkt(key, C_ENCAP_PKTS, skb->len, 1);
		return encap6_to(skb, &p, key, r->peer, r->token, &p.daddr);
	}
	struct in6 *oldp = bpf_map_lookup_elem(&nat6, &p.daddr);
	if (!oldp)
		return TC_ACT_OK;
	struct in6 old_ip = *oldp;
	struct vm6 *v = bpf_map_lookup_elem(&vms6, &old_ip);
	if (!v)
		return TC_ACT_OK;
	__u32 key = v->stats_key;
	if (!l4_csum_off6(&p))
		return TC_ACT_OK; /* extension headers: not translated */
	if (is_icmp6_error(&p)) {
		/* About a packet the VM sent from new_ip6: it must learn of
		 * it as of its own packet, from old_ip6 and its port. */
		struct icmp6_quote q;
		__u16 qs, qd;
		if (!load_quote6(skb, &q, &qs, &qd) && in6_eq(&q.ip.saddr, &p.daddr)) {
			struct flow6_key ck = {.vm_ip = old_ip, .remote_ip = q.ip.daddr, .vm_port = qs, .remote_port = qd,
					       .proto = q.ip.nexthdr};
			__u16 *gp = bpf_map_lookup_elem(&nat_ports6, &ck);
			if (xlate_quote6(skb, &q, 1, &old_ip, gp ? *gp : qd))
				return drop(key, C_DROP_ERROR);
		}
	} else if (p.has_ports) {
		struct flow6_key ck = {};
		guest_key6(&ck, &p, &old_ip, 0);
		__u16 *gp = bpf_map_lookup_elem(&nat_ports6, &ck);
		__u16 port = gp ? *gp : new_flow6(&ck, &p, key, bpf_ktime_get_ns());
		if (!port)
			return drop(key, C_DROP_CLASH);
		if (rewrite_port6(skb, &p, 1, port))
			return drop(key, C_DROP_ERROR);
	}
	if (rewrite_addr6(skb, &p, 0, &old_ip))
		return drop(key, C_DROP_ERROR);
	count(key, C_DNAT_PKTS, 1);
	return deliver6(skb, v, key);
}

/* vm_ndp answers a local VM's solicitation for any address but its own
 * (its gateway, or a neighbour of its old subnet) with the gateway's MAC. */
static __always_inline int vm_ndp(struct __sk_buff *skb, struct pkt6 *p)
{
	struct ndp_msg m;
	if (!load_ns(skb, p, &m))
		return TC_ACT_OK;
	__u32 ifindex = skb->ifindex;
	struct in6 *old = bpf_map_lookup_elem(&taps6, &ifindex);
	if (!old)
		return TC_ACT_OK;
	struct in6 o = *old;
	struct vm6 *v = bpf_map_lookup_elem(&vms6, &o);
	if (!v || in6_eq(&m.target, &o) || in6_eq(&m.target, &p->saddr))
		return TC_ACT_OK;
	return ndp_answer(skb, &m, v->gw_mac, in6_eq(&m.target, &v->gw_ip), v->stats_key);
}

/* vm_icmp6_error is vm_icmp_error for IPv6: about a NAT flow, from new_ip6
 * quoting the packet as the client sent it; else back through the tunnel. */
static __always_inline int vm_icmp6_error(struct __sk_buff *skb, struct pkt6 *p, struct vm6 *v)
{
	__u32 key = v->stats_key;
	struct icmp6_quote q;
	__u16 qs, qd;
	struct flow *f = NULL;
	if (!load_quote6(skb, &q, &qs, &qd) && in6_eq(&q.ip.daddr, &p->saddr)) {
		struct flow6_key k = {.vm_ip = p->saddr, .remote_ip = q.ip.saddr, .vm_port = qd, .remote_port = qs,
				      .proto = q.ip.nexthdr};
		f = bpf_map_lookup_elem(&flows6, &k);
	}
	int has_new = !in6_zero(&v->new_ip);
	if (has_new && ((f && f->nat) || !v->peer)) {
		struct in6 new_ip = v->new_ip;
		if ((f && xlate_quote6(skb, &q, 0, &new_ip, f->remote_port)) || rewrite_addr6(skb, p, 1, &new_ip))
			return drop(key, C_DROP_ERROR);
		count(key, C_SNAT_PKTS, 1);
		return fib_redirect6(skb, key, &new_ip, &p->daddr);
	}
	if (!v->peer)
		return TC_ACT_OK;
	if (f && f->remote_port != qs && xlate_quote6(skb, &q, 0, &q.ip.daddr, f->remote_port))
		return drop(key, C_DROP_ERROR);
	count(key, C_TUNNEL_BACK_PKTS, 1);
	struct in6 gw = v->gw_ip;
	return encap6_to(skb, p, key, v->peer, v->token, &gw);
}

/* vm6 is vm_ingress for IPv6 packets. */
static __always_inline int vm6(struct __sk_buff *skb)
{
	struct pkt6 p;
	if (!parse_ipv6(skb, &p))
		return TC_ACT_OK;
	if (p.proto == IPPROTO_ICMPV6_ && p.icmp_type == NDP_NS)
		return vm_ndp(skb, &p);
	struct vm6 *v = bpf_map_lookup_elem(&vms6, &p.saddr);
	if (!v)
		return TC_ACT_OK;
	__u32 key = v->stats_key;
	if (is_icmp6_error(&p))
		return vm_icmp6_error(skb, &p, v);
	struct flow *f = NULL;
	struct flow6_key k = {};
	if (p.has_ports) {
		guest_key6(&k, &p, &p.saddr, 1);
		f = bpf_map_lookup_elem(&flows6, &k);
	}
	int has_new = !in6_zero(&v->new_ip);
	int new_conn = p.proto == IPPROTO_TCP && (p.tcp_flags & (TCP_FLAG_SYN_ | TCP_FLAG_ACK_)) == TCP_FLAG_SYN_;
	__u16 client_port = p.dport;
	struct in6 gw = v->gw_ip;
	if (new_conn && has_new) {
		struct flow n = {.last_ns = bpf_ktime_get_ns(), .remote_port = p.dport, .nat = 1};
		bpf_map_update_elem(&flows6, &k, &n, BPF_ANY);
		bpf_map_update_elem(&nat_ports6, &k, &p.dport, BPF_ANY);
	} else if (f) {
		flow_touch(f, tcp_closes(p.proto, p.tcp_flags), bpf_ktime_get_ns());
		client_port = f->remote_port;
		if (!f->nat && v->peer) {
			if (rewrite_port6(skb, &p, 0, client_port))
				return drop(key, C_DROP_ERROR);
			count(key, C_TUNNEL_BACK_PKTS, 1);
			return encap6_to(skb, &p, key, v->peer, v->token, &gw);
		}
	} else if (v->peer) {
		if (p.has_ports) {
			struct flow n = {.last_ns = bpf_ktime_get_ns(), .remote_port = p.dport, .closing = tcp_closes(p.proto, p.tcp_flags)};
			bpf_map_update_elem(&flows6, &k, &n, BPF_NOEXIST);
		}
		count(key, C_TUNNEL_BACK_PKTS, 1);
		return encap6_to(skb, &p, key, v->peer, v->token, &gw);
	}
	if (!has_new)
		return TC_ACT_OK;
	struct in6 new_ip = v->new_ip;
	if (rewrite_port6(skb, &p, 0, client_port) || rewrite_addr6(skb, &p, 1, &new_ip))
		return drop(key, C_DROP_ERROR);
	count(key, C_SNAT_PKTS, 1);
	return fib_redirect6(skb, key, &new_ip, &p.daddr);
}
