/* nat.h: host B's 1:1 NAT: guest 4-tuples in use, client port translation on a clash, port rewrite. */
#pragma once
#include "helpers.h"

/* flow_expired reports whether a guest 4-tuple last used at f->last_ns is
 * free again at now (see TIME_WAIT_NS). */
static __always_inline int flow_expired(const struct flow *f, __u8 proto, __u64 now)
{
	__u64 age = now - f->last_ns;
	if (f->closing)
		return age > TIME_WAIT_NS;
	return age > (proto == IPPROTO_TCP ? TCP_IDLE_NS : UDP_IDLE_NS);
}

/* tcp_closes reports whether a packet of protocol proto with TCP flags
 * byte tcp_flags ends its TCP connection (FIN or RST); either family. */
static __always_inline __u8 tcp_closes(__u8 proto, __u8 tcp_flags)
{
	return proto == IPPROTO_TCP && (tcp_flags & (TCP_FLAG_FIN_ | TCP_FLAG_RST_));
}

/* flow_touch refreshes a flow in place: last_ns, and closing once a FIN or
 * RST went by (closes: tcp_closes of the packet). */
static __always_inline void flow_touch(struct flow *f, __u8 closes, __u64 now)
{
	f->last_ns = now;
	if (closes)
		f->closing = 1;
}

/* guest_key fills the guest-side tuple of packet p of VM vm_ip; from_vm:
 * p was sent by the VM (else to it). */
static __always_inline void guest_key(struct flow_key *k, const struct pkt *p, __u32 vm_ip, int from_vm)
{
	k->vm_ip = vm_ip;
	k->proto = p->proto;
	k->remote_ip = from_vm ? p->daddr : p->saddr;
	k->vm_port = from_vm ? p->sport : p->dport;
	k->remote_port = from_vm ? p->dport : p->sport;
}

/* rewrite_port replaces p's source (is_src) or destination port (ICMP echo:
 * the id) with to, fixing the L4 checksum (UDP's zero checksum stays zero).
 * A fragment after the first has no ports to rewrite: nothing is done.
 * Precondition: parse_ipv4 accepted p with has_ports. Returns 0 on success. */
static __always_inline int rewrite_port(struct __sk_buff *skb, struct pkt *p, int is_src, __u16 to)
{
	__u16 from = is_src ? p->sport : p->dport;
	__u32 off = L4_OFF + (is_src ? 0 : 2), csum_off, flags = sizeof(to);
	if (from == to || p->frag == FRAG_LATER)
		return 0;
	if (p->proto == IPPROTO_TCP) {
		csum_off = L4_OFF + offsetof(struct tcphdr, check);
	} else if (p->proto == IPPROTO_UDP) {
		csum_off = L4_OFF + offsetof(struct udphdr, check);
		flags |= BPF_F_MARK_MANGLED_0;
	} else if (p->proto == IPPROTO_ICMP) {
		off = L4_OFF + offsetof(struct icmphdr, un.echo.id);
		csum_off = L4_OFF + offsetof(struct icmphdr, checksum);
	} else {
		return -1;
	}
	if (bpf_l4_csum_replace(skb, csum_off, from, to, flags) || bpf_skb_store_bytes(skb, off, &to, sizeof(to), 0))
		return -1;
	if (is_src)
		p->sport = to;
	else
		p->dport = to;
	return 0;
}

/* port_free reports whether guest tuple k may carry the flow (nat or not)
 * whose client port is client_port: unused, that same flow, or expired. */
static __always_inline int port_free(struct flow_key *k, __u16 client_port, __u8 nat, __u64 now)
{
	struct flow *f = bpf_map_lookup_elem(&flows, k);
	return !f || (f->nat == nat && f->remote_port == client_port) || flow_expired(f, k->proto, now);
}

/* new_flow picks the guest-side port of a new flow whose client side is ck
 * (ck->remote_port: the client's own port; ck->via: VIA_NEW_IP for a NAT
 * flow): the client's own if that guest 4-tuple is free, else the first
 * free one from a hashed offset in NAT_PORT_MIN.., as netfilter's
 * get_unique_tuple does. It records the flow in flows and nat_ports.
 * Returns the port (network order), 0 if none is free. */
static __always_inline __u16 new_flow(struct flow_key *ck, const struct pkt *p, __u64 now)
{
	__u8 nat = ck->via == VIA_NEW_IP;
	struct flow_key gk = *ck;
	gk.via = 0;
	__u16 port = ck->remote_port;
	__u32 h = ck->remote_ip ^ ((__u32)ck->remote_port << 16 | ck->vm_port) ^ (__u32)now;
	for (int i = 0; i <= NAT_PORT_TRIES; i++) {
		if (i > 0)
			port = bpf_htons(NAT_PORT_MIN + (h + i * 7919) % NAT_PORT_RANGE);
		gk.remote_port = port;
		if (port_free(&gk, ck->remote_port, nat, now)) {
			struct flow f = {.last_ns = now, .remote_port = ck->remote_port, .nat = nat, .closing = tcp_closes(p->proto, p->tcp_flags)};
			if (bpf_map_update_elem(&flows, &gk, &f, BPF_ANY) ||
			    bpf_map_update_elem(&nat_ports, ck, &port, BPF_ANY))
				return 0;
			if (i > 0)
				count(ck->vm_ip, C_NAT_PORT_XLATE, 1);
			return port;
		}
		if (ck->proto != IPPROTO_TCP && ck->proto != IPPROTO_UDP && ck->proto != IPPROTO_ICMP)
			return 0;
	}
	return 0;
}

/* frag_ports gives a VM's fragment its datagram's ports, as Cilium's
 * fragment map does: the first fragment records them under (addresses,
 * IP id, protocol); later ones, which have no L4 header, read them back
 * (has_ports stays 0 if the first was not seen). */
static __always_inline void frag_ports(struct pkt *p)
{
	struct frag_key k = {.saddr = p->saddr, .daddr = p->daddr, .id = p->ip_id, .proto = p->proto};
	if (p->frag == FRAG_FIRST && p->has_ports) {
		struct frag_ports v = {.sport = p->sport, .dport = p->dport};
		bpf_map_update_elem(&frags, &k, &v, BPF_ANY);
	} else if (p->frag == FRAG_LATER) {
		struct frag_ports *v = bpf_map_lookup_elem(&frags, &k);
		if (v) {
			p->sport = v->sport;
			p->dport = v->dport;
			p->has_ports = 1;
		}
	}
}

/* An ICMP error's quoted packet (RFC 792: its IP header and first 8 bytes):
 * the offending packet as its sender sent it. */
struct icmp_quote {
	struct iphdr ip;
	__u8 l4[8];
} __attribute__((packed));

#define QUOTE_OFF (L4_OFF + 8)

/* is_icmp_error reports whether p is an ICMP error that quotes a packet:
 * destination unreachable, time exceeded, parameter problem. */
static __always_inline int is_icmp_error(struct __sk_buff *skb, const struct pkt *p)
{
	__u8 type;
	if (p->proto != IPPROTO_ICMP || p->frag != FRAG_NONE || bpf_skb_load_bytes(skb, L4_OFF, &type, 1))
		return 0;
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB;
}

/* quote_ports reads the ports of a quoted packet's first 8 L4 bytes l4
 * (protocol proto) into *sport, *dport as the parsers give them: TCP and
 * UDP ports; for an ICMP echo of type echo_req or echo_reply (icmp_proto:
 * ICMP or ICMPv6), the id as the requester's port; else 0. */
static __always_inline void quote_ports(__u8 proto, const __u8 *l4, __u8 icmp_proto, __u8 echo_req, __u8 echo_reply,
					__u16 *sport, __u16 *dport)
{
	__u16 w[3];
	__builtin_memcpy(w, l4, sizeof(w));
	*sport = 0;
	*dport = 0;
	if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		*sport = w[0];
		*dport = w[1];
	} else if (proto == icmp_proto && l4[0] == echo_req) {
		*sport = w[2];
	} else if (proto == icmp_proto && l4[0] == echo_reply) {
		*dport = w[2];
	}
}

/* quote_udp_csum fixes the checksum of a quoted UDP header rewritten from
 * l4 to n (its first 8 bytes; n's port words already new) whose pseudo-
 * header address changed by addr_diff (bpf_csum_diff of old and new
 * address). A zero checksum (none, IPv4) stays zero. */
static __always_inline void quote_udp_csum(__s64 addr_diff, const __u8 *l4, __u8 *n)
{
	if (!(l4[6] | l4[7]))
		return;
	__s64 d = bpf_csum_diff((__be32 *)&l4[0], 4, (__be32 *)&n[0], 4, (__wsum)addr_diff);
	__u16 c;
	__builtin_memcpy(&c, &l4[6], 2);
	__u64 sum = (__u32)d + (__u64)(__u16)~c;
	c = csum_fold((__u32)((sum & 0xffff) + (sum >> 16)));
	if (c == 0)
		c = 0xffff;
	__builtin_memcpy(&n[6], &c, 2);
}

/* load_quote reads the quoted packet of ICMP error p into q and its ports
 * into *sport, *dport (TCP, UDP; ICMP echo as parse_ipv4 gives them).
 * Returns 0 if the quote is a whole 20-byte IPv4 header and 8 bytes. */
static __always_inline int load_quote(struct __sk_buff *skb, struct icmp_quote *q, __u16 *sport, __u16 *dport)
{
	if (bpf_skb_load_bytes(skb, QUOTE_OFF, q, sizeof(*q)) || q->ip.version != 4 || q->ip.ihl != 5)
		return -1;
	quote_ports(q->ip.protocol, q->l4, IPPROTO_ICMP, ICMP_ECHO, ICMP_ECHOREPLY, sport, dport);
	return 0;
}

/* xlate_quote rewrites the quoted packet q of ICMP error skb: its source
 * address (addr_is_src) or destination address to addr, and the TCP/UDP
 * port on the other side to port (network order; as is if equal). It fixes
 * the quoted IP header's checksum, a quoted UDP checksum, and the ICMP
 * checksum. The outer header is the caller's. Returns 0 on success. */
static __always_inline int xlate_quote(struct __sk_buff *skb, struct icmp_quote *q, int addr_is_src, __u32 addr, __u16 port)
{
	struct icmp_quote n = *q;
	__u32 from_addr = addr_is_src ? q->ip.saddr : q->ip.daddr;
	if (addr_is_src)
		n.ip.saddr = addr;
	else
		n.ip.daddr = addr;
	int l4 = q->ip.protocol == IPPROTO_TCP || q->ip.protocol == IPPROTO_UDP;
	if (l4)
		__builtin_memcpy(&n.l4[addr_is_src ? 2 : 0], &port, 2);
	n.ip.check = 0;
	n.ip.check = ipv4_csum(&n.ip);
	if (q->ip.protocol == IPPROTO_UDP)
		quote_udp_csum(bpf_csum_diff(&from_addr, 4, &addr, 4, 0), q->l4, n.l4);
	__s64 diff = bpf_csum_diff((__be32 *)q, sizeof(*q), (__be32 *)&n, sizeof(n), 0);
	if (diff < 0 || bpf_l4_csum_replace(skb, L4_OFF + offsetof(struct icmphdr, checksum), 0, diff, 0) ||
	    bpf_skb_store_bytes(skb, QUOTE_OFF, &n, sizeof(n), 0))
		return -1;
	return 0;
}
