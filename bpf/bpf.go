// Package bpf holds vmhop's BPF programs (C, in this directory) and their
// generated Go bindings. The generated files are committed so `go build`
// needs no clang; `make generate` rebuilds them. proxy/datapath loads them.
package bpf

//go:generate go tool bpf2go -cc ${BPF_CLANG} -cflags ${BPF_CFLAGS} -target bpfel Datapath datapath.c
