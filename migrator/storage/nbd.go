package storage

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// The relay speaks the NBD handshake (fixed newstyle) itself at both ends,
// so that QEMU's blocking connect of the mirror target is local: the relay
// negotiates with the destination's server beforehand, as a client, and
// later answers the source QEMU's negotiation from what it learnt. Neither
// side gets structured replies, so the transmission phases that follow are
// byte for byte the same protocol and are spliced unchanged.
const (
	nbdFlagFixedNewstyle = 1 << 0
	nbdFlagNoZeroes      = 1 << 1
	nbdOptAbort          = 2
	nbdOptInfo           = 6
	nbdReplyMagic        = 0x3e889045565a9
	nbdRepAck            = 1
	nbdRepInfo           = 3
	nbdRepErrUnsup       = 1<<31 | 1
	nbdInfoExport        = 0
	nbdInfoBlockSize     = 3
	nbdMaxOption         = 4096
	nbdSimpleReplyMagic  = 0x67446698
	nbdCmdDisconnect     = 2
	nbdEIO               = 5
)

// nbdExport is what the destination's server said about the export.
type nbdExport struct {
	export    []byte // NBD_INFO_EXPORT payload: type(2) size(8) transmission flags(2)
	blockSize []byte // NBD_INFO_BLOCK_SIZE payload, if the server gave one
}

// nbdClientHandshake negotiates as a client up to the transmission phase:
// NBD_OPT_GO for name, asking for block sizes, simple replies only.
func nbdClientHandshake(rw io.ReadWriter, name string) (*nbdExport, error) {
	greet := make([]byte, 18)
	if _, err := io.ReadFull(rw, greet[:16]); err != nil {
		return nil, fmt.Errorf("nbd: server greeting: %w", err)
	}
	if string(greet[:16]) != "NBDMAGICIHAVEOPT" {
		return nil, fmt.Errorf("nbd: server greeting %q is not fixed newstyle", greet[:16])
	}
	if _, err := io.ReadFull(rw, greet[16:]); err != nil {
		return nil, fmt.Errorf("nbd: server greeting: %w", err)
	}
	sflags := binary.BigEndian.Uint16(greet[16:])
	if sflags&nbdFlagFixedNewstyle == 0 {
		return nil, errors.New("nbd: server does not offer fixed newstyle")
	}
	cflags := uint32(nbdFlagFixedNewstyle)
	if sflags&nbdFlagNoZeroes != 0 {
		cflags |= nbdFlagNoZeroes
	}
	req := binary.BigEndian.AppendUint32(nil, cflags)
	data := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	data = append(data, name...)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, nbdInfoBlockSize)
	req = append(req, "IHAVEOPT"...)
	req = binary.BigEndian.AppendUint32(req, nbdOptGo)
	req = binary.BigEndian.AppendUint32(req, uint32(len(data)))
	req = append(req, data...)
	if _, err := rw.Write(req); err != nil {
		return nil, err
	}
	exp := &nbdExport{}
	for {
		hdr := make([]byte, 20)
		if _, err := io.ReadFull(rw, hdr); err != nil {
			return nil, fmt.Errorf("nbd: option reply: %w", err)
		}
		if binary.BigEndian.Uint64(hdr) != nbdReplyMagic {
			return nil, fmt.Errorf("nbd: bad option reply magic %x", hdr[:8])
		}
		typ, n := binary.BigEndian.Uint32(hdr[12:]), binary.BigEndian.Uint32(hdr[16:])
		if n > nbdMaxOption {
			return nil, fmt.Errorf("nbd: option reply of %d bytes", n)
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(rw, body); err != nil {
			return nil, fmt.Errorf("nbd: option reply: %w", err)
		}
		switch {
		case typ == nbdRepAck:
			if len(exp.export) != 12 {
				return nil, errors.New("nbd: server acknowledged GO without export information")
			}
			return exp, nil
		case typ == nbdRepInfo && len(body) >= 2:
			switch binary.BigEndian.Uint16(body) {
			case nbdInfoExport:
				if len(body) != 12 {
					return nil, fmt.Errorf("nbd: export information of %d bytes", len(body))
				}
				exp.export = body
			case nbdInfoBlockSize:
				exp.blockSize = body
			}
		case typ&(1<<31) != 0:
			return nil, fmt.Errorf("nbd: server refused export %q: error %d %s", name, typ&^(1<<31), body)
		}
	}
}

// nbdServeHandshake answers a client's negotiation with exp: GO, INFO and
// EXPORT_NAME get the export's information; everything else (structured
// replies, meta contexts, TLS, lists) is declined, which a client must
// accept.
func nbdServeHandshake(rw io.ReadWriter, exp *nbdExport) error {
	greet := append([]byte("NBDMAGICIHAVEOPT"), 0, nbdFlagFixedNewstyle|nbdFlagNoZeroes)
	if _, err := rw.Write(greet); err != nil {
		return err
	}
	cf := make([]byte, 4)
	if _, err := io.ReadFull(rw, cf); err != nil {
		return fmt.Errorf("nbd: client flags: %w", err)
	}
	noZeroes := binary.BigEndian.Uint32(cf)&nbdFlagNoZeroes != 0
	reply := func(opt, typ uint32, body []byte) error {
		b := binary.BigEndian.AppendUint64(nil, nbdReplyMagic)
		b = binary.BigEndian.AppendUint32(b, opt)
		b = binary.BigEndian.AppendUint32(b, typ)
		b = binary.BigEndian.AppendUint32(b, uint32(len(body)))
		_, err := rw.Write(append(b, body...))
		return err
	}
	for {
		hdr := make([]byte, 16)
		if _, err := io.ReadFull(rw, hdr); err != nil {
			return fmt.Errorf("nbd: client option: %w", err)
		}
		if !bytes.Equal(hdr[:8], []byte("IHAVEOPT")) {
			return fmt.Errorf("nbd: client option magic %q", hdr[:8])
		}
		opt, n := binary.BigEndian.Uint32(hdr[8:]), binary.BigEndian.Uint32(hdr[12:])
		if n > nbdMaxOption {
			return fmt.Errorf("nbd: client option %d of %d bytes", opt, n)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(rw, data); err != nil {
			return fmt.Errorf("nbd: client option %d: %w", opt, err)
		}
		switch opt {
		case nbdOptExportName:
			b := append([]byte{}, exp.export[2:]...) // size, flags
			if !noZeroes {
				b = append(b, make([]byte, 124)...)
			}
			_, err := rw.Write(b)
			return err
		case nbdOptGo, nbdOptInfo:
			if err := reply(opt, nbdRepInfo, exp.export); err != nil {
				return err
			}
			if exp.blockSize != nil && wantsBlockSize(data) {
				if err := reply(opt, nbdRepInfo, exp.blockSize); err != nil {
					return err
				}
			}
			if err := reply(opt, nbdRepAck, nil); err != nil {
				return err
			}
			if opt == nbdOptGo {
				return nil
			}
		case nbdOptAbort:
			reply(opt, nbdRepAck, nil)
			return errors.New("nbd: client aborted the negotiation")
		default:
			if err := reply(opt, nbdRepErrUnsup, nil); err != nil {
				return err
			}
		}
	}
}

// wantsBlockSize reads a GO/INFO request: name length, name, count, items.
func wantsBlockSize(data []byte) bool {
	if len(data) < 4 {
		return false
	}
	off := 4 + int(binary.BigEndian.Uint32(data))
	if off+2 > len(data) {
		return false
	}
	k := int(binary.BigEndian.Uint16(data[off:]))
	for i := 0; i < k && off+4+2*i <= len(data); i++ {
		if binary.BigEndian.Uint16(data[off+2+2*i:]) == nbdInfoBlockSize {
			return true
		}
	}
	return false
}

// nbdRefuseRequests answers every request on a connection in its
// transmission phase with EIO until the client disconnects (simple
// replies: magic, error, handle).
func nbdRefuseRequests(rw io.ReadWriter) {
	hdr := make([]byte, 28)
	for {
		if _, err := io.ReadFull(rw, hdr); err != nil {
			return
		}
		if binary.BigEndian.Uint32(hdr) != nbdRequestMagic {
			return
		}
		typ, n := binary.BigEndian.Uint16(hdr[6:]), binary.BigEndian.Uint32(hdr[24:])
		if typ == nbdCmdWrite {
			if _, err := io.CopyN(io.Discard, rw, int64(n)); err != nil {
				return
			}
		}
		if typ == nbdCmdDisconnect {
			return
		}
		rep := binary.BigEndian.AppendUint32(nil, nbdSimpleReplyMagic)
		rep = binary.BigEndian.AppendUint32(rep, nbdEIO)
		rep = append(rep, hdr[8:16]...)
		if _, err := rw.Write(rep); err != nil {
			return
		}
	}
}
