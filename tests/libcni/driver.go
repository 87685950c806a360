// Command driver runs a CNI network list through libcni, the library containerd, CRI-O and
// Multus call plugins with, so the tests see what those runtimes would: the chain's
// prevResult threading, libcni's result cache, CHECK with the cached result, DEL twice.
//
//	driver -conflist F -path DIR[:DIR] -cache DIR -id ID -netns PATH [-ifname eth0] [-args K=V;K=V] add|check|del
//
// add prints the result as JSON; every error goes to stderr with exit status 1.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/containernetworking/cni/libcni"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

// pairs splits "K=V;K=V" as containerd's K8S_POD_* arguments are passed.
func pairs(text string) [][2]string {
	var out [][2]string
	for _, item := range strings.Split(text, ";") {
		if item == "" {
			continue
		}
		kv := strings.SplitN(item, "=", 2)
		if len(kv) != 2 {
			fail("-args: %q is not KEY=VALUE", item)
		}
		out = append(out, [2]string{kv[0], kv[1]})
	}
	return out
}

func main() {
	conflist := flag.String("conflist", "", "the network list (.conflist)")
	path := flag.String("path", "", "plugin folders, colon-separated")
	cache := flag.String("cache", "", "libcni's cache folder (results/ goes under it)")
	id := flag.String("id", "", "container id")
	netns := flag.String("netns", "", "network namespace path")
	ifname := flag.String("ifname", "eth0", "interface name")
	args := flag.String("args", "", "CNI_ARGS as KEY=VALUE;KEY=VALUE")
	flag.Parse()
	if flag.NArg() != 1 || *conflist == "" || *path == "" || *cache == "" || *id == "" {
		fail("usage: driver -conflist F -path DIRS -cache DIR -id ID [-netns P] add|check|del")
	}
	list, err := libcni.ConfListFromFile(*conflist)
	if err != nil {
		fail("reading %s: %v", *conflist, err)
	}
	cni := libcni.NewCNIConfigWithCacheDir(strings.Split(*path, ":"), *cache, nil)
	rt := &libcni.RuntimeConf{ContainerID: *id, NetNS: *netns, IfName: *ifname, Args: pairs(*args)}
	ctx := context.Background()
	switch flag.Arg(0) {
	case "add":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail("%v", err)
		}
		if err := json.NewEncoder(os.Stdout).Encode(result); err != nil {
			fail("printing the result: %v", err)
		}
	case "check":
		if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
			fail("%v", err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			fail("%v", err)
		}
	default:
		fail("unknown command %q: add, check or del", flag.Arg(0))
	}
}
