package main

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmhop/vmhop/daemon/pki"
)

func newCertsCmd() *cobra.Command {
	var dir string
	c := &cobra.Command{
		Use:   "certs",
		Short: "Make a small CA and host certificates for vmhopd's mutual TLS (ECDSA P-256)",
		Long: "Make the files vmhopd's tls keys name: a CA (ca.pem, ca-key.pem) once, then per host a\n" +
			"certificate for its name (NAME.pem, NAME-key.pem). Copy ca.pem and the host's two files to\n" +
			"each host (/etc/vmhop/tls/), keep ca-key.pem off the hosts. Existing files are never\n" +
			"replaced. README.md gives the same steps with openssl.",
	}
	c.PersistentFlags().StringVar(&dir, "dir", ".", "directory of the CA's and the hosts' files")

	var caName string
	var caDays int
	ca := &cobra.Command{
		Use:   "ca",
		Short: "Make the CA: DIR/ca.pem (to every host: tls.ca) and DIR/ca-key.pem (keep it safe, 0600)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if caDays < 1 {
				return fmt.Errorf("--days: %d is below 1", caDays)
			}
			ca, err := pki.NewCA(caName, time.Duration(caDays)*24*time.Hour)
			if err != nil {
				return err
			}
			key, err := ca.KeyPEM()
			if err != nil {
				return err
			}
			certFile, keyFile := filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem")
			if err := pki.WriteNew(keyFile, key, 0o600); err != nil {
				return fmt.Errorf("write ca key: %w", err)
			}
			if err := pki.WriteNew(certFile, ca.CertPEM(), 0o644); err != nil {
				return fmt.Errorf("write ca certificate: %w", err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s\n%s\n", certFile, keyFile)
			return nil
		},
	}
	ca.Flags().StringVar(&caName, "name", "vmhop CA", "the CA's common name")
	ca.Flags().IntVar(&caDays, "days", 3650, "validity in days")

	var ips []string
	var hostDays int
	host := &cobra.Command{
		Use:   "host NAME",
		Short: "Make host NAME's key and certificate, signed by DIR's CA: DIR/NAME.pem (tls.cert), DIR/NAME-key.pem (tls.key)",
		Long: "NAME is the host's vmhopd name (config key vmhopd.name) and the name its peers list it by\n" +
			"(peers[].name): it becomes the certificate's DNS subjectAltName and common name.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			name := args[0]
			if hostDays < 1 {
				return fmt.Errorf("--days: %d is below 1", hostDays)
			}
			var addrs []netip.Addr
			for _, s := range ips {
				a, err := netip.ParseAddr(s)
				if err != nil {
					return fmt.Errorf("--ip: %q is not an IP address", s)
				}
				addrs = append(addrs, a)
			}
			ca, err := pki.LoadCA(filepath.Join(dir, "ca.pem"), filepath.Join(dir, "ca-key.pem"))
			if err != nil {
				return fmt.Errorf("--dir: %w (make one with `vmhop certs ca`)", err)
			}
			certPEM, keyPEM, err := ca.Issue(name, addrs, time.Duration(hostDays)*24*time.Hour)
			if err != nil {
				return err
			}
			certFile, keyFile := filepath.Join(dir, name+".pem"), filepath.Join(dir, name+"-key.pem")
			if err := pki.WriteNew(keyFile, keyPEM, 0o600); err != nil {
				return fmt.Errorf("write host key: %w", err)
			}
			if err := pki.WriteNew(certFile, certPEM, 0o644); err != nil {
				return fmt.Errorf("write host certificate: %w", err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "%s\n%s\n", certFile, keyFile)
			return nil
		},
	}
	host.Flags().StringSliceVar(&ips, "ip", nil, "IP addresses to add as subjectAltNames (optional; peers are checked by NAME)")
	host.Flags().IntVar(&hostDays, "days", 825, "validity in days")
	c.AddCommand(ca, host)
	return c
}
