/* csum.h: checksum helpers. */
#pragma once
#include <linux/types.h>
#include <bpf/bpf_helpers.h>

/* csum_fold folds a 32-bit partial sum (as bpf_csum_diff returns) into the
 * 16-bit one's complement checksum to store in a header. */
static __always_inline __u16 csum_fold(__u32 csum)
{
	csum = (csum & 0xffff) + (csum >> 16);
	csum = (csum & 0xffff) + (csum >> 16);
	return (__u16)~csum;
}

/* ipv4_csum returns the header checksum of a 20-byte IPv4 header whose
 * check field is zero. */
static __always_inline __u16 ipv4_csum(void *iph)
{
	return csum_fold(bpf_csum_diff(0, 0, iph, 20, 0));
}
