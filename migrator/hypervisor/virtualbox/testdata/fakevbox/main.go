// Command fakevbox plays VBoxManage for the virtualbox driver's contract
// tests: it checks the exact arguments of the commands the driver uses
// (VirtualBox 7.x syntax), keeps each host's VM state in a JSON file, and
// prints what VBoxManage prints, failures included.
//
// Environment: FAKEVBOX_DIR (state and calls.log), FAKEVBOX_HOST (this
// host's name), FAKEVBOX_PEER (the other host's), FAKEVBOX_FAIL=teleport
// (the teleport fails at 30%), FAKEVBOX_STEP (ms per 10% of a teleport).
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

type vm struct {
	Name       string `json:"name"`
	State      string `json:"state"`
	Teleporter bool   `json:"teleporter"`
	Port       string `json:"port"`
	Address    string `json:"address"`
	Password   string `json:"password"`
	// As VirtualBox reports them (showvminfo): NIC 1's MAC (12 hex
	// digits) and bridge, the disk on "SATA Controller" port 0.
	MAC    string `json:"mac,omitempty"`
	Bridge string `json:"bridge,omitempty"`
	Disk   string `json:"disk,omitempty"`
}

func path(host string) string { return filepath.Join(os.Getenv("FAKEVBOX_DIR"), host+".json") }

func load(host string) map[string]*vm {
	m := map[string]*vm{}
	b, err := os.ReadFile(path(host))
	if err == nil {
		json.Unmarshal(b, &m)
	}
	return m
}

func save(host string, m map[string]*vm) {
	b, _ := json.Marshal(m)
	os.WriteFile(path(host), b, 0o644)
}

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, "VBoxManage: error: "+format+"\n", a...)
	os.Exit(1)
}

// want checks args against a fixed shape; "*" matches any value.
func want(args []string, shape ...string) {
	if len(args) != len(shape) {
		fail("Syntax error: %q (want %q)", strings.Join(args, " "), strings.Join(shape, " "))
	}
	for i := range shape {
		if shape[i] != "*" && args[i] != shape[i] {
			fail("Syntax error: argument %d is %q, want %q", i, args[i], shape[i])
		}
	}
}

func readPassword(file string) string {
	b, err := os.ReadFile(file)
	if err != nil || len(strings.TrimSpace(string(b))) == 0 {
		fail("Failed to read the password file %q", file)
	}
	return strings.TrimSpace(string(b))
}

func main() {
	host := os.Getenv("FAKEVBOX_HOST")
	args := os.Args[1:]
	if f, err := os.OpenFile(filepath.Join(os.Getenv("FAKEVBOX_DIR"), "calls.log"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644); err == nil {
		fmt.Fprintf(f, "%s: %s\n", host, strings.Join(args, " "))
		f.Close()
	}
	for _, a := range args {
		if a == "--password" || a == "--teleporter-password" {
			fail("a password on the command line (%s): use a password file", a)
		}
	}
	if len(args) < 2 {
		fail("Syntax error: no command")
	}
	vms := load(host)
	v, ok := vms[args[1]]
	if !ok {
		fail("Could not find a registered machine named '%s'", args[1])
	}
	switch args[0] {
	case "showvminfo":
		want(args, "showvminfo", "*", "--machinereadable")
		fmt.Printf("name=%q\nVMState=%q\nteleporterenabled=%q\n", v.Name, v.State, map[bool]string{true: "on", false: "off"}[v.Teleporter])
		if v.Disk != "" {
			fmt.Printf("storagecontrollername0=\"SATA Controller\"\n\"SATA Controller-0-0\"=%q\n\"SATA Controller-ImageUUID-0-0\"=\"6f1ec3a2-0c4e-4a4c-9a55-1b2f9c1e0d11\"\n\"SATA Controller-1-0\"=\"none\"\n", v.Disk)
		}
		if v.MAC != "" {
			fmt.Printf("nic1=\"bridged\"\nbridgeadapter1=%q\nmacaddress1=%q\ncableconnected1=\"on\"\nnic2=\"none\"\n", v.Bridge, v.MAC)
		}
	case "modifyvm":
		if len(args) == 4 {
			want(args, "modifyvm", "*", "--teleporter", "off")
			v.Teleporter = false
			break
		}
		want(args, "modifyvm", "*", "--teleporter", "on", "--teleporter-port", "*", "--teleporter-address", "*", "--teleporter-password-file", "*")
		if v.State != "poweroff" {
			fail("The machine '%s' is already locked for a session (or being unlocked)", v.Name)
		}
		v.Teleporter, v.Port, v.Address, v.Password = true, args[5], args[7], readPassword(args[9])
	case "startvm":
		want(args, "startvm", "*", "--type", "headless")
		fmt.Printf("Waiting for VM %q to power on...\n", v.Name)
		if v.Teleporter {
			v.State = "teleportingin"
		} else {
			v.State = "running"
		}
		fmt.Printf("VM %q has been successfully started.\n", v.Name)
	case "controlvm":
		if len(args) < 3 {
			fail("Syntax error: controlvm needs an action")
		}
		switch args[2] {
		case "pause":
			want(args, "controlvm", "*", "pause")
			if v.State != "running" {
				fail("Machine in invalid state %s -- running expected", v.State)
			}
			v.State = "paused"
		case "resume":
			want(args, "controlvm", "*", "resume")
			if v.State != "paused" {
				fail("Machine in invalid state %s -- paused expected", v.State)
			}
			v.State = "running"
		case "poweroff":
			want(args, "controlvm", "*", "poweroff")
			v.State = "poweroff"
		case "teleport":
			want(args, "controlvm", "*", "teleport", "--host", "*", "--port", "*", "--maxdowntime", "*", "--passwordfile", "*")
			if v.State != "running" && v.State != "paused" {
				fail("Machine in invalid state %s", v.State)
			}
			if _, err := strconv.Atoi(args[8]); err != nil {
				fail("Invalid --maxdowntime %q", args[8])
			}
			pw := readPassword(args[10])
			peer := os.Getenv("FAKEVBOX_PEER")
			dvms := load(peer)
			d, ok := dvms[args[1]]
			if !ok || d.State != "teleportingin" || !d.Teleporter {
				fail("Teleporter: connection refused (no VM waiting on %s:%s)", args[4], args[6])
			}
			if d.Port != args[6] || d.Address != args[4] {
				fail("Teleporter: connection refused (%s:%s is not where the target listens)", args[4], args[6])
			}
			if d.Password != pw {
				fail("Teleporter: Invalid password")
			}
			step, _ := strconv.Atoi(os.Getenv("FAKEVBOX_STEP"))
			for p := 0; p <= 100; p += 10 {
				fmt.Printf("%d%%...", p)
				time.Sleep(time.Duration(step) * time.Millisecond)
				if p == 30 && os.Getenv("FAKEVBOX_FAIL") == "teleport" {
					fmt.Println()
					fail("Teleporter: connection reset by peer")
				}
			}
			fmt.Println()
			v.State = "poweroff"
			d.State, d.Teleporter = "running", false
			save(peer, dvms)
		default:
			fail("Invalid parameter '%s'", args[2])
		}
	default:
		fail("Invalid command '%s'", args[0])
	}
	save(host, vms)
}
