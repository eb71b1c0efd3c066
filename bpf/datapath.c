//go:build ignore

// SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0)
/* datapath.c: the vmhop network-continuity datapath, two TC programs.
 *
 * uplink_ingress, on each host's WAN-facing interface:
 *   - ARP for a redirected old address or a new address: answer it.
 *   - tunnel packets (UDP to TUNNEL_PORT) from a peer with a migration's
 *     token: decapsulate; deliver to the local VM it
 *     is for, or forward it (the old host relaying the VM's replies).
 *   - to an old address with its redirect on (old host): tunnel to the peer.
 *   - to a new address (new host): rewrite to the old address, deliver.
 * vm_ingress, on a moved VM's tap (new host):
 *   - ARP from the VM: answer with the old gateway's MAC.
 *   - IPv4 from the VM: flows to new_ip (NAT flows) and new outbound TCP
 *     connections leave with source new_ip; everything else goes back
 *     through the tunnel while the VM has a peer, so connections made
 *     before the move keep their address end to end.
 * IPv6 (a dual-stack VM's IPv6 side) takes the same paths inside the IPv4
 * tunnel, with neighbour discovery in place of ARP (ipv6.h).
 * Anything not understood (IPv4 options, IPv6 extension headers at the
 * NAT, truncated) is passed on untouched. Fragments follow their datagram
 * (nat.h: frag_ports). */
#include "encap.h"
#include "nat.h"
#include "ipv6.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* deliver sends a packet for a local VM into its tap (queued there while
 * the VM is paused, read by QEMU on resume). */
static __always_inline int deliver(struct __sk_buff *skb, struct vm *v, __u32 key)
{
	if (set_macs(skb, v->vm_mac, v->gw_mac))
		return drop(key, C_DROP_ERROR);
	count(key, C_DELIVER_PKTS, 1);
	return bpf_redirect(v->ifindex, 0);
}

/* note_flow records, on the old host before the switch, a flow to VM
 * vm_ip (p: a packet from the client), refreshing it in place when known
 * (one lookup); datapath.MoveFlows hands them to the new host, so its NAT
 * gives no new flow a tuple the guest still holds (open, or in TIME_WAIT). */
static __always_inline void note_flow(const struct pkt *p, __u32 vm_ip)
{
	struct flow_key k = {};
	__u64 now = bpf_ktime_get_ns();
	guest_key(&k, p, vm_ip, 0);
	struct flow *f = bpf_map_lookup_elem(&flows, &k);
	if (f) {
		flow_touch(f, tcp_closes(p->proto, p->tcp_flags), now);
		return;
	}
	struct flow n = {.last_ns = now, .remote_port = p->sport, .closing = tcp_closes(p->proto, p->tcp_flags)};
	bpf_map_update_elem(&flows, &k, &n, BPF_NOEXIST);
}

/* track_tunnel_flow records, on the new host, a flow that reached VM
 * vm_ip through the tunnel (p: the decapsulated packet), so no NAT flow
 * takes its guest 4-tuple. If a NAT flow holds that tuple, the client's
 * port is translated as for a NAT flow. The common case is one lookup.
 * Returns 0, or -1 to drop the packet. */
static __always_inline int track_tunnel_flow(struct __sk_buff *skb, struct pkt *p, __u32 vm_ip)
{
	struct flow_key k = {};
	__u64 now = bpf_ktime_get_ns();
	guest_key(&k, p, vm_ip, 0);
	struct flow *f = bpf_map_lookup_elem(&flows, &k);
	if (f && !f->nat && f->remote_port == p->sport) {
		flow_touch(f, tcp_closes(p->proto, p->tcp_flags), now);
		return 0;
	}
	if (!f) {
		struct flow n = {.last_ns = now, .remote_port = p->sport, .closing = tcp_closes(p->proto, p->tcp_flags)};
		bpf_map_update_elem(&flows, &k, &n, BPF_NOEXIST);
		return 0;
	}
	/* The tuple is another flow's: this one gets a port of its own. */
	k.via = VIA_TUNNEL;
	__u16 *gp = bpf_map_lookup_elem(&nat_ports, &k);
	__u16 port = gp ? *gp : new_flow(&k, p, now);
	if (!port || rewrite_port(skb, p, 1, port))
		return drop(vm_ip, C_DROP_CLASH);
	return 0;
}

/* tunnel_icmp_error: an ICMP error through the tunnel about a packet the
 * VM sent on a tunnel flow whose client port was translated (it met a NAT
 * flow's tuple) quotes the client's own port; the VM must see its own.
 * Returns 0 on success (or nothing to do). */
static __always_inline int tunnel_icmp_error(struct __sk_buff *skb, struct pkt *p)
{
	struct icmp_quote q;
	__u16 qs, qd;
	if (load_quote(skb, &q, &qs, &qd) || q.ip.saddr != p->daddr)
		return 0;
	struct flow_key ck = {.vm_ip = p->daddr, .remote_ip = q.ip.daddr, .vm_port = qs, .remote_port = qd,
			      .proto = q.ip.protocol, .via = VIA_TUNNEL};
	__u16 *gp = bpf_map_lookup_elem(&nat_ports, &ck);
	if (!gp || *gp == qd)
		return 0;
	return xlate_quote(skb, &q, 1, q.ip.saddr, *gp);
}

static __always_inline int from_peer(struct __sk_buff *skb, struct pkt *outer)
{
	__u32 len = skb->len;
	/* The inner packet's version: IPv6 for a dual-stack VM's IPv6 side. */
	__u8 ver;
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 *inner = data + ETH_HLEN_ + TUNNEL_OVERHEAD;
	if ((void *)(inner + 1) <= data_end)
		ver = *inner;
	else if (bpf_skb_load_bytes(skb, ETH_HLEN_ + TUNNEL_OVERHEAD, &ver, 1))
		return TC_ACT_SHOT;
	if ((ver >> 4) == 6) {
		__be16 proto = bpf_htons(ETH_P_IPV6_);
		if (bpf_skb_adjust_room(skb, -TUNNEL_OVERHEAD, BPF_ADJ_ROOM_MAC,
					BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV6) ||
		    bpf_skb_store_bytes(skb, 12, &proto, 2, 0))
			return TC_ACT_SHOT;
		return from_peer6(skb, len);
	}
	if (decap(skb))
		return TC_ACT_SHOT;
	struct pkt p;
	if (!parse_ipv4(skb, &p))
		return TC_ACT_SHOT; /* a tunnel carries only what we put in */
	struct vm *v = bpf_map_lookup_elem(&vms, &p.daddr);
	__u32 key = v ? p.daddr : p.saddr;
	count_pkt(key, C_DECAP_PKTS, len, 0);
	if (v) {
		if (p.has_ports && track_tunnel_flow(skb, &p, p.daddr))
			return TC_ACT_SHOT;
		if (is_icmp_error(skb, &p) && tunnel_icmp_error(skb, &p))
			return drop(key, C_DROP_ERROR);
		return deliver(skb, v, key);
	}
	/* The old host relays the moved VM's replies to their clients. */
	return fib_redirect(skb, key, p.saddr, p.daddr);
}

struct arp_eth {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[6];
	__u8 spa[4];
	__u8 tha[6];
	__u8 tpa[4];
} __attribute__((packed));

/* arp_answer turns the ARP request a into a reply from ip at mac and sends
 * it back out of the interface it came in on. */
static __always_inline int arp_answer(struct __sk_buff *skb, struct arp_eth *a, const __u8 *mac, __u32 key)
{
	struct arp_eth r = *a;
	r.op = bpf_htons(2);
	__builtin_memcpy(r.tha, a->sha, 6);
	__builtin_memcpy(r.tpa, a->spa, 4);
	__builtin_memcpy(r.sha, mac, 6);
	__builtin_memcpy(r.spa, a->tpa, 4);
	if (set_macs(skb, a->sha, mac) || bpf_skb_store_bytes(skb, ETH_HLEN_, &r, sizeof(r), 0))
		return drop(key, C_DROP_ERROR);
	count(key, C_ARP_REPLIES, 1);
	return bpf_redirect(skb->ifindex, 0);
}

/* load_arp_request reads an Ethernet/IPv4 ARP request. Returns 1 if it is one. */
static __always_inline int load_arp_request(struct __sk_buff *skb, struct arp_eth *a)
{
	if (bpf_skb_load_bytes(skb, ETH_HLEN_, a, sizeof(*a)))
		return 0;
	return a->htype == bpf_htons(1) && a->ptype == bpf_htons(ETH_P_IP_) && a->hlen == 6 && a->plen == 4 &&
	       a->op == bpf_htons(1);
}

/* uplink_arp answers, on the uplink, ARP for an old address whose redirect
 * is on (the VM left: its neighbours must still find it here) and for a new
 * address (the VM arrived). Packets to either are taken at this hook
 * whatever their destination MAC, so the VM's MAC serves for both. */
static __always_inline int uplink_arp(struct __sk_buff *skb)
{
	struct arp_eth a;
	if (!load_arp_request(skb, &a))
		return TC_ACT_OK;
	__u32 tpa;
	__builtin_memcpy(&tpa, a.tpa, 4);
	struct redirect *r = bpf_map_lookup_elem(&redirects, &tpa);
	if (r && r->mode == REDIRECT_ON)
		return arp_answer(skb, &a, r->mac, tpa);
	__u32 *old = bpf_map_lookup_elem(&nat, &tpa);
	if (old) {
		__u32 old_ip = *old;
		struct vm *v = bpf_map_lookup_elem(&vms, &old_ip);
		if (v)
			return arp_answer(skb, &a, v->vm_mac, old_ip);
	}
	return TC_ACT_OK;
}

/* is_arp reports whether the frame is ARP (0 for runts too). */
static __always_inline int is_arp(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	return (void *)(eth + 1) <= data_end && eth->h_proto == bpf_htons(ETH_P_ARP_);
}

SEC("tc")
int uplink_ingress(struct __sk_buff *skb)
{
	if (is_arp(skb))
		return uplink_arp(skb);
	struct pkt p;
	if (!parse_ipv4(skb, &p))
		return uplink6(skb);
	if (p.proto == IPPROTO_UDP && p.dport == bpf_htons(TUNNEL_PORT) && p.daddr == local_ip) {
		int t = tunnel_check(skb, &p);
		if (t == TUNNEL_OK)
			return from_peer(skb, &p);
		if (t == TUNNEL_SPOOFED)
			return TC_ACT_SHOT;
	}

	struct redirect *r = bpf_map_lookup_elem(&redirects, &p.daddr);
	if (r) {
		if (r->mode == REDIRECT_ON) {
			__u32 key = p.daddr;
			count_pkt(key, C_ENCAP_PKTS, skb->len, 1);
			return encap_to(skb, &p, key, r->peer, r->token, local_ip);
		}
		if (p.has_ports)
			note_flow(&p, p.daddr);
	}

	__u32 *old = bpf_map_lookup_elem(&nat, &p.daddr);
	if (old) {
		__u32 old_ip = *old;
		struct vm *v = bpf_map_lookup_elem(&vms, &old_ip);
		if (!v)
			return TC_ACT_OK;
		if (is_icmp_error(skb, &p)) {
			/* About a packet the VM sent from new_ip: it must learn
			 * of it as of its own packet, from old_ip to the port
			 * it used. */
			struct icmp_quote q;
			__u16 qs, qd;
			if (!load_quote(skb, &q, &qs, &qd) && q.ip.saddr == p.daddr) {
				struct flow_key ck = {.vm_ip = old_ip, .remote_ip = q.ip.daddr, .vm_port = qs, .remote_port = qd,
						      .proto = q.ip.protocol};
				__u16 *gp = bpf_map_lookup_elem(&nat_ports, &ck);
				if (xlate_quote(skb, &q, 1, old_ip, gp ? *gp : qd))
					return drop(old_ip, C_DROP_ERROR);
			}
		} else if (p.has_ports) {
			/* The guest must never see two client flows on one
			 * 4-tuple: a new flow whose tuple is taken gets another
			 * client port (new_flow). */
			struct flow_key ck = {};
			guest_key(&ck, &p, old_ip, 0);
			__u16 *gp = bpf_map_lookup_elem(&nat_ports, &ck);
			__u16 port = gp ? *gp : new_flow(&ck, &p, bpf_ktime_get_ns());
			if (!port)
				return drop(old_ip, C_DROP_CLASH);
			if (rewrite_port(skb, &p, 1, port))
				return drop(old_ip, C_DROP_ERROR);
		}
		if (rewrite_addr(skb, &p, 0, old_ip))
			return drop(old_ip, C_DROP_ERROR);
		count(old_ip, C_DNAT_PKTS, 1);
		return deliver(skb, v, old_ip);
	}
	return TC_ACT_OK;
}

/* arp_reply answers a local VM's ARP request for any address but its own
 * with the old gateway's MAC: the guest still believes it is on its old
 * subnet, and every address there is now reached through this host. */
static __always_inline int arp_reply(struct __sk_buff *skb)
{
	struct arp_eth a;
	if (!load_arp_request(skb, &a))
		return TC_ACT_OK;
	__u32 spa, tpa;
	__builtin_memcpy(&spa, a.spa, 4);
	__builtin_memcpy(&tpa, a.tpa, 4);
	struct vm *v = bpf_map_lookup_elem(&vms, &spa);
	if (!v || tpa == spa || tpa == 0)
		return TC_ACT_OK; /* not a moved VM, or duplicate address detection */
	return arp_answer(skb, &a, v->gw_mac, spa);
}

/* vm_icmp_error sends a local VM's ICMP error the way the flow it is
 * about goes: about a NAT flow, from new_ip, quoting the packet as the
 * client sent it (new_ip, the client's own port); else back through the
 * tunnel (quoting the client's own port if it was translated). */
static __always_inline int vm_icmp_error(struct __sk_buff *skb, struct pkt *p, struct vm *v)
{
	__u32 key = p->saddr;
	struct icmp_quote q;
	__u16 qs, qd;
	struct flow *f = NULL;
	if (!load_quote(skb, &q, &qs, &qd) && q.ip.daddr == p->saddr) {
		struct flow_key k = {.vm_ip = p->saddr, .remote_ip = q.ip.saddr, .vm_port = qd, .remote_port = qs,
				     .proto = q.ip.protocol};
		f = bpf_map_lookup_elem(&flows, &k);
	}
	if (v->new_ip && ((f && f->nat) || !v->peer)) {
		__u32 new_ip = v->new_ip;
		if ((f && xlate_quote(skb, &q, 0, new_ip, f->remote_port)) || rewrite_addr(skb, p, 1, new_ip))
			return drop(key, C_DROP_ERROR);
		count(key, C_SNAT_PKTS, 1);
		return fib_redirect(skb, key, new_ip, p->daddr);
	}
	if (!v->peer)
		return TC_ACT_OK;
	if (f && f->remote_port != qs && xlate_quote(skb, &q, 0, q.ip.daddr, f->remote_port))
		return drop(key, C_DROP_ERROR);
	count(key, C_TUNNEL_BACK_PKTS, 1);
	return encap_to(skb, p, key, v->peer, v->token, v->gw_ip);
}

SEC("tc")
int vm_ingress(struct __sk_buff *skb)
{
	if (is_arp(skb))
		return arp_reply(skb);

	struct pkt p;
	if (!parse_ipv4(skb, &p))
		return vm6(skb);
	struct vm *v = bpf_map_lookup_elem(&vms, &p.saddr);
	if (!v)
		return TC_ACT_OK;
	__u32 key = p.saddr;
	if (is_icmp_error(skb, &p))
		return vm_icmp_error(skb, &p, v);
	if (p.frag != FRAG_NONE)
		frag_ports(&p);
	struct flow *f = NULL;
	struct flow_key k = {};
	if (p.has_ports) {
		guest_key(&k, &p, p.saddr, 1);
		f = bpf_map_lookup_elem(&flows, &k);
	}
	int new_conn = p.proto == IPPROTO_TCP && (p.tcp_flags & (TCP_FLAG_SYN_ | TCP_FLAG_ACK_)) == TCP_FLAG_SYN_;
	__u16 client_port = p.dport;
	if (new_conn && v->new_ip) {
		/* The VM's own new connection: a NAT flow, from new_ip. */
		__u64 now = bpf_ktime_get_ns();
		struct flow n = {.last_ns = now, .remote_port = p.dport, .nat = 1};
		struct flow_key ck = k;
		bpf_map_update_elem(&flows, &k, &n, BPF_ANY);
		bpf_map_update_elem(&nat_ports, &ck, &p.dport, BPF_ANY);
	} else if (f) {
		flow_touch(f, tcp_closes(p.proto, p.tcp_flags), bpf_ktime_get_ns());
		client_port = f->remote_port;
		if (!f->nat && v->peer) {
			if (rewrite_port(skb, &p, 0, client_port))
				return drop(key, C_DROP_ERROR);
			count(key, C_TUNNEL_BACK_PKTS, 1);
			return encap_to(skb, &p, key, v->peer, v->token, v->gw_ip);
		}
	} else if (v->peer) {
		/* Not known as a NAT flow: made before the move, back through the tunnel. */
		if (p.has_ports) {
			struct flow n = {.last_ns = bpf_ktime_get_ns(), .remote_port = p.dport, .closing = tcp_closes(p.proto, p.tcp_flags)};
			bpf_map_update_elem(&flows, &k, &n, BPF_NOEXIST);
		}
		count(key, C_TUNNEL_BACK_PKTS, 1);
		return encap_to(skb, &p, key, v->peer, v->token, v->gw_ip);
	}
	if (!v->new_ip)
		return TC_ACT_OK;
	if (rewrite_port(skb, &p, 0, client_port) || rewrite_addr(skb, &p, 1, v->new_ip))
		return drop(key, C_DROP_ERROR);
	count(key, C_SNAT_PKTS, 1);
	return fib_redirect(skb, key, v->new_ip, p.daddr);
}
