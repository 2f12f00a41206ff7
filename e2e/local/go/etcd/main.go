// Command etcd is the etcd server, built from the published module so that
// e2e/local/control-plane.sh needs no binary download.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
