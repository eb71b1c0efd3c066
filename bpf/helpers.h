/* helpers.h: counters, forwarding (fib lookup + redirect), NAT rewrite, MSS clamp. */
#pragma once
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <stddef.h>
#include "maps.h"
#include "parse.h"
#include "csum.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* This host's tunnel endpoint address (network order), set by the loader. */
volatile const __u32 local_ip = 0;

/* count adds n to counter c of old address ip, if it has a stats entry. */
static __always_inline void count(__u32 ip, enum counter c, __u64 n)
{
	struct counters *s = bpf_map_lookup_elem(&stats, &ip);
	if (s && c < C_MAX)
		s->c[c] += n;
}

/* count_pkt counts one packet of len bytes in slots pkts and pkts+1 with a
 * single lookup (this is the per-packet path), and stamps last_ns if stamp. */
static __always_inline void count_pkt(__u32 ip, enum counter pkts, __u64 len, int stamp)
{
	struct counters *s = bpf_map_lookup_elem(&stats, &ip);
	if (!s || pkts + 1 >= C_MAX)
		return;
	s->c[pkts] += 1;
	s->c[pkts + 1] += len;
	if (stamp)
		s->last_ns = bpf_ktime_get_ns();
}

static __always_inline int drop(__u32 ip, enum counter why)
{
	count(ip, why, 1);
	return TC_ACT_SHOT;
}

/* fib_lookup_out looks up the route of p (family and addresses set by the
 * caller: fib_out, fib_redirect6), writes the next hop's MACs
 * into the frame and sets *ifindex to the device to send out of (for a
 * bridge, its uplink port: egress_ports). Returns 0 when ready to send,
 * FIB_NO_NEIGH if the next hop is not resolved yet (*ifindex set, MACs
 * not), or -1 (counted) if there is no route or the MACs cannot be
 * written. */
#define FIB_NO_NEIGH 1
static __always_inline int fib_lookup_out(struct __sk_buff *skb, __u32 key, struct bpf_fib_lookup *p, __u32 *ifindex)
{
	p->ifindex = skb->ingress_ifindex;
	/* The FIB checks tot_len against the route's MTU; a GSO packet is
	 * segmented to fit later, so only a plain packet's length is given. */
	p->tot_len = skb->gso_size ? 0 : skb->len - ETH_HLEN_;
	long rc = bpf_fib_lookup(skb, p, sizeof(*p), 0);
	*ifindex = p->ifindex;
	if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
		if (bpf_skb_store_bytes(skb, 0, p->dmac, 6, 0) || bpf_skb_store_bytes(skb, 6, p->smac, 6, 0)) {
			count(key, C_DROP_ERROR, 1);
			return -1;
		}
		__u32 *port = bpf_map_lookup_elem(&egress_ports, &p->ifindex);
		if (port)
			*ifindex = *port;
		return 0;
	}
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return FIB_NO_NEIGH;
	count(key, C_DROP_NO_ROUTE, 1);
	return -1;
}

/* fib_out is fib_lookup_out for IPv4 src -> dst (network order). */
static __always_inline int fib_out(struct __sk_buff *skb, __u32 key, __u32 src, __u32 dst, __u32 *ifindex)
{
	struct bpf_fib_lookup p = {.family = AF_INET, .ipv4_src = src, .ipv4_dst = dst};
	return fib_lookup_out(skb, key, &p, ifindex);
}

/* fib_send turns fib_lookup_out's result rc and device into a TC
 * action: redirect with the MACs written, or let the kernel resolve the
 * neighbour (redirect_neigh), or drop. */
static __always_inline int fib_send(int rc, __u32 ifindex)
{
	if (rc == 0)
		return bpf_redirect(ifindex, 0);
	if (rc == FIB_NO_NEIGH)
		return bpf_redirect_neigh(ifindex, NULL, 0, 0);
	return TC_ACT_SHOT;
}

/* fib_redirect sends the packet (IPv4 from src to dst, Ethernet header in
 * place) out of the interface the FIB picks (fib_out), with the next hop's
 * MAC. Returns a TC action. */
static __always_inline int fib_redirect(struct __sk_buff *skb, __u32 key, __u32 src, __u32 dst)
{
	__u32 ifindex;
	return fib_send(fib_out(skb, key, src, dst, &ifindex), ifindex);
}

/* set_macs writes the Ethernet addresses. */
static __always_inline int set_macs(struct __sk_buff *skb, const __u8 *dst, const __u8 *src)
{
	if (bpf_skb_store_bytes(skb, 0, dst, 6, 0) || bpf_skb_store_bytes(skb, 6, src, 6, 0))
		return -1;
	return 0;
}

/* rewrite_addr replaces the source (is_src) or destination IPv4 address and
 * fixes the IP and TCP/UDP checksums (UDP's zero checksum stays zero; a
 * fragment after the first has no L4 header: the first one's checksum
 * covers the whole datagram).
 * Precondition: parse_ipv4 accepted the packet. Returns 0 on success. */
static __always_inline int rewrite_addr(struct __sk_buff *skb, struct pkt *p, int is_src, __u32 to)
{
	__u32 from = is_src ? p->saddr : p->daddr;
	__u32 off = ETH_HLEN_ + (is_src ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
	if (p->frag == FRAG_LATER) {
		/* no L4 header */
	} else if (p->proto == IPPROTO_TCP) {
		if (bpf_l4_csum_replace(skb, L4_OFF + offsetof(struct tcphdr, check), from, to, BPF_F_PSEUDO_HDR | sizeof(to)))
			return -1;
	} else if (p->proto == IPPROTO_UDP) {
		if (bpf_l4_csum_replace(skb, L4_OFF + offsetof(struct udphdr, check), from, to,
					BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | sizeof(to)))
			return -1;
	}
	if (bpf_l3_csum_replace(skb, ETH_HLEN_ + offsetof(struct iphdr, check), from, to, sizeof(to)))
		return -1;
	if (bpf_skb_store_bytes(skb, off, &to, sizeof(to), 0))
		return -1;
	if (is_src)
		p->saddr = to;
	else
		p->daddr = to;
	return 0;
}

/* clamp_mss lowers the MSS option of a TCP SYN whose TCP header is at
 * l4_off to max_mss, fixing the TCP checksum. Packets without the option
 * are left alone. */
static __always_inline void clamp_mss(struct __sk_buff *skb, __u32 key, __u32 l4_off, __u16 max_mss)
{
	__u8 doff;
	if (bpf_skb_load_bytes(skb, l4_off + 12, &doff, 1))
		return;
	__u32 end = l4_off + (doff >> 4) * 4;
	__u32 off = l4_off + 20;
	for (int i = 0; i < MAX_TCP_OPTIONS; i++) {
		if (off + 2 > end || off > l4_off + 60)
			return;
		__u8 opt[2];
		if (bpf_skb_load_bytes(skb, off, opt, 1))
			return;
		if (opt[0] == 0) /* end of options */
			return;
		if (opt[0] == 1) { /* no-op */
			off++;
			continue;
		}
		if (bpf_skb_load_bytes(skb, off, opt, 2) || opt[1] < 2)
			return;
		if (opt[0] == 2 && opt[1] == 4) {
			__u16 mss;
			if (bpf_skb_load_bytes(skb, off + 2, &mss, 2))
				return;
			if (bpf_ntohs(mss) > max_mss) {
				__u16 nmss = bpf_htons(max_mss);
				/* The checksum sums aligned 16-bit words: a field at an
				 * odd offset enters it byte-swapped. */
				int odd = (off + 2 - l4_off) & 1;
				__u16 cf = odd ? __builtin_bswap16(mss) : mss;
				__u16 ct = odd ? __builtin_bswap16(nmss) : nmss;
				if (bpf_l4_csum_replace(skb, l4_off + offsetof(struct tcphdr, check), cf, ct, 2) ||
				    bpf_skb_store_bytes(skb, off + 2, &nmss, 2, 0))
					return;
				count(key, C_MSS_CLAMPED, 1);
			}
			return;
		}
		off += opt[1];
	}
}
