/* parse.h: packet parsing into struct pkt. */
#pragma once
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include "consts.h"

/* icmphdr: linux/icmp.h pulls in libc headers, so the few fields used are here. */
struct icmphdr {
	__u8 type;
	__u8 code;
	__u16 checksum;
	union {
		struct {
			__be16 id;
			__be16 sequence;
		} echo;
		struct {
			__be16 unused;
			__be16 mtu;
		} frag;
	} un;
};
#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_FRAG_NEEDED 4
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12

/* pkt is what the programs need to know of an IPv4 packet. */
struct pkt {
	__u32 saddr, daddr; /* network order */
	__u16 sport, dport; /* network order; ICMP echo: the id as the requester's port, 0 the other */
	__u16 tot_len;      /* host order */
	__u8 proto;
	__u8 tos;
	__u8 tcp_flags;     /* TCP: the flags byte */
	__u8 df;            /* don't-fragment set */
	__u8 has_ports;     /* sport/dport valid */
	__u8 frag;          /* FRAG_NONE, FRAG_FIRST (offset 0, MF) or FRAG_LATER (no L4 header) */
	__u16 ip_id;        /* network order */
};

#define FRAG_NONE 0
#define FRAG_FIRST 1
#define FRAG_LATER 2

#define TCP_FLAG_FIN_ 0x01
#define TCP_FLAG_SYN_ 0x02
#define TCP_FLAG_RST_ 0x04
#define TCP_FLAG_ACK_ 0x10
#define L4_OFF (ETH_HLEN_ + IPV4_HLEN)

/* parse_ports reads the ports (network order) and, for TCP, the flags
 * byte of the TCP or UDP header at l4 (proto says which). Returns 0 if the
 * header is truncated. Both families' parsers use it. */
static __always_inline int parse_ports(void *l4, void *data_end, __u8 proto, __u16 *sport, __u16 *dport, __u8 *tcp_flags)
{
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;
		if ((void *)(th + 1) > data_end)
			return 0;
		*sport = th->source;
		*dport = th->dest;
		*tcp_flags = ((__u8 *)th)[13];
		return 1;
	}
	struct udphdr *uh = l4;
	if ((void *)(uh + 1) > data_end)
		return 0;
	*sport = uh->source;
	*dport = uh->dest;
	return 1;
}

/* parse_ipv4 reads the IPv4 packet after the Ethernet header.
 * Returns 1 for a packet the datapath may rewrite: IPv4, no IP options, not
 * truncated; a fragment after the first has no ports (has_ports 0, frag
 * FRAG_LATER). Returns 0 for anything else, which callers pass on
 * untouched. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP_))
		return 0;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return 0;
	if (ip->version != 4 || ip->ihl != 5)
		return 0;
	__u16 tot = bpf_ntohs(ip->tot_len);
	if (tot < IPV4_HLEN || (skb->gso_size == 0 && skb->len < ETH_HLEN_ + (__u32)tot))
		return 0;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->tot_len = tot;
	p->proto = ip->protocol;
	p->tos = ip->tos;
	p->df = (ip->frag_off & bpf_htons(0x4000)) != 0;
	p->has_ports = 0;
	p->tcp_flags = 0;
	p->sport = 0;
	p->dport = 0;
	p->ip_id = ip->id;
	__u16 fo = bpf_ntohs(ip->frag_off);
	p->frag = (fo & 0x1fff) ? FRAG_LATER : (fo & 0x2000) ? FRAG_FIRST : FRAG_NONE;
	if (p->frag == FRAG_LATER)
		return 1;
	if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) {
		if (!parse_ports(ip + 1, data_end, ip->protocol, &p->sport, &p->dport, &p->tcp_flags))
			return 0;
		p->has_ports = 1;
	} else if (ip->protocol == IPPROTO_ICMP) {
		struct icmphdr *ih = (void *)(ip + 1);
		if ((void *)(ih + 1) > data_end)
			return 0;
		/* The id is the port of the side that sent the request. */
		if (ih->type == ICMP_ECHO) {
			p->sport = ih->un.echo.id;
			p->dport = 0;
			p->has_ports = 1;
		} else if (ih->type == ICMP_ECHOREPLY) {
			p->sport = 0;
			p->dport = ih->un.echo.id;
			p->has_ports = 1;
		}
	}
	return 1;
}
