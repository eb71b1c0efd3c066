package wgpath

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// The nftables rules, one table per tunnel (MSS clamp) and per VM entry
// (NAT and the tunnel-back mark), each added or replaced in one batch.

// ifname is an interface name as nftables compares it (NUL-padded).
func ifname(n string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, n)
	return b
}

func u32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }

func ip4(a netip.Addr) []byte { b := a.As4(); return b[:] }

func meta(key expr.MetaKey, op expr.CmpOp, data []byte) []expr.Any {
	return []expr.Any{&expr.Meta{Key: key, Register: 1}, &expr.Cmp{Op: op, Register: 1, Data: data}}
}

// ipField matches the IPv4 header's source (offset 12) or destination (16).
func ipField(off uint32, a netip.Addr) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ip4(a)},
	}
}

func saddr(a netip.Addr) []expr.Any { return ipField(12, a) }
func daddr(a netip.Addr) []expr.Any { return ipField(16, a) }

// tcpFlags matches TCP segments whose flags under mask equal want.
func tcpFlags(mask, want byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{mask}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{want}},
	}
}

const (
	tcpFIN, tcpSYN, tcpRST, tcpACK = 0x01, 0x02, 0x04, 0x10
	ipsDstNAT                      = 0x20 // IPS_DST_NAT: the connection was DNATed
)

func rule(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func accept() []expr.Any { return []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}} }

// clampMSS sets a SYN's MSS option to the route's MTU less 40 (never
// raises it): nft's `tcp option maxseg size set rt mtu`.
func clampMSS() []expr.Any {
	return []expr.Any{
		&expr.Rt{Register: 1, Key: expr.RtTCPMSS},
		&expr.Byteorder{SourceRegister: 1, DestRegister: 1, Op: expr.ByteorderHton, Len: 2, Size: 2},
		&expr.Exthdr{Op: expr.ExthdrOpTcpopt, Type: 2, Offset: 2, Len: 2, SourceRegister: 1},
	}
}

// addClampTable adds table ip <tunnel>: SYNs forwarded into the tunnel
// get their MSS clamped to its MTU (connections opened across it then
// never send segments it would have to refuse).
func addClampTable(c *nftables.Conn, tunName string) error {
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: tunName})
	ch := c.AddChain(&nftables.Chain{Name: "clamp", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityMangle})
	c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: rule(
		meta(expr.MetaKeyOIFNAME, expr.CmpOpEq, ifname(tunName)), tcpFlags(tcpSYN|tcpRST, tcpSYN), clampMSS())})
	return c.Flush()
}

// delTable deletes table ip name; one that is not there is no error.
func delTable(c *nftables.Conn, name string) error {
	c.DelTable(&nftables.Table{Family: nftables.TableFamilyIPv4, Name: name})
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// vmTable is the name of a VM entry's table.
func vmTable(old netip.Addr) string {
	return "vmhop_vm_" + strings.ReplaceAll(old.String(), ".", "_")
}

// vmRules are a VM entry's chains on the destination host: prerouting
// NAT (new_ip -> old_ip), postrouting NAT (the VM's own connections out
// of anything but the tunnel leave from new_ip), and with a tunnel, the
// mark that policy-routes the VM's other packets back into it:
//
//	iif tap, ip saddr old_ip:  ct status dnat  -> accept (a reply to new_ip: conntrack undoes the DNAT)
//	                           ct mark M       -> accept (a connection the VM opened: SNAT)
//	                           ct state new, TCP SYN -> ct mark set M, accept
//	                           else            -> meta mark set M (-> rule fwmark M -> table M: the tunnel)
type vmRules struct {
	Pre, Post, Mark [][]expr.Any
}

func buildVMRules(v VM, tunName string, mark uint32) vmRules {
	var r vmRules
	r.Pre = append(r.Pre, rule(daddr(v.NewIP), []expr.Any{
		&expr.Immediate{Register: 1, Data: ip4(v.OldIP)},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegAddrMax: 1},
	}))
	snat := []expr.Any{
		&expr.Immediate{Register: 1, Data: ip4(v.NewIP)},
		&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: 1, RegAddrMax: 1},
	}
	if tunName == "" {
		r.Post = append(r.Post, rule(saddr(v.OldIP), snat))
		return r
	}
	r.Post = append(r.Post, rule(saddr(v.OldIP), meta(expr.MetaKeyOIFNAME, expr.CmpOpNeq, ifname(tunName)), snat))
	fromVM := rule(meta(expr.MetaKeyIIFNAME, expr.CmpOpEq, ifname(v.Tap)), saddr(v.OldIP))
	r.Mark = append(r.Mark,
		rule(fromVM, []expr.Any{
			&expr.Ct{Register: 1, Key: expr.CtKeySTATUS},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: u32(ipsDstNAT), Xor: u32(0)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: u32(0)},
		}, accept()),
		rule(fromVM, []expr.Any{
			&expr.Ct{Register: 1, Key: expr.CtKeyMARK},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: u32(mark)},
		}, accept()),
		rule(fromVM, []expr.Any{
			&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: u32(expr.CtStateBitNEW), Xor: u32(0)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: u32(0)},
		}, tcpFlags(tcpSYN|tcpACK|tcpFIN|tcpRST, tcpSYN), []expr.Any{
			&expr.Immediate{Register: 1, Data: u32(mark)},
			&expr.Ct{Register: 1, Key: expr.CtKeyMARK, SourceRegister: true},
		}, accept()),
		rule(fromVM, []expr.Any{
			&expr.Immediate{Register: 1, Data: u32(mark)},
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1, SourceRegister: true},
		}),
	)
	return r
}

// setVMTable replaces the VM's table with r, in one batch (no moment
// without NAT).
func setVMTable(c *nftables.Conn, name string, r vmRules, exists bool) error {
	t := &nftables.Table{Family: nftables.TableFamilyIPv4, Name: name}
	if exists {
		c.DelTable(t)
	}
	t = c.AddTable(t)
	chains := []struct {
		name  string
		typ   nftables.ChainType
		hook  *nftables.ChainHook
		prio  *nftables.ChainPriority
		rules [][]expr.Any
	}{
		{"mark", nftables.ChainTypeFilter, nftables.ChainHookPrerouting, nftables.ChainPriorityMangle, r.Mark},
		{"pre", nftables.ChainTypeNAT, nftables.ChainHookPrerouting, nftables.ChainPriorityNATDest, r.Pre},
		{"post", nftables.ChainTypeNAT, nftables.ChainHookPostrouting, nftables.ChainPriorityNATSource, r.Post},
	}
	for _, ch := range chains {
		if len(ch.rules) == 0 {
			continue
		}
		chain := c.AddChain(&nftables.Chain{Name: ch.name, Table: t, Type: ch.typ, Hooknum: ch.hook, Priority: ch.prio})
		for _, e := range ch.rules {
			c.AddRule(&nftables.Rule{Table: t, Chain: chain, Exprs: e})
		}
	}
	return c.Flush()
}

// Tables lists the nftables tables (family ip) in namespace ns whose
// names this package makes (tunnels' and VM entries'): what a test
// asserts is gone.
func Tables(ns string) ([]string, error) {
	var out []string
	err := withNft(ns, func(c *nftables.Conn) error {
		ts, err := c.ListTablesOfFamily(nftables.TableFamilyIPv4)
		for _, t := range ts {
			if strings.HasPrefix(t.Name, "vhwg") || strings.HasPrefix(t.Name, "vmhop_vm_") {
				out = append(out, t.Name)
			}
		}
		return err
	})
	return out, err
}

// sendARP sends frame out of ifi count times (AF_PACKET).
func sendARP(ifi *net.Interface, frame []byte, count int) error {
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ARP)))
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	to := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: ifi.Index, Halen: 6}
	copy(to.Addr[:], frame[:6])
	for range count {
		if err := unix.Sendto(fd, frame, 0, to); err != nil {
			return err
		}
	}
	return nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
