// Package packaging holds the Debian package's nfpm config (nfpm.yaml) and
// maintainer scripts for `make deb`; its test builds the package and
// unpacks it into a scratch root. No Go code ships from here.
package packaging
