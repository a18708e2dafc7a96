// xds-scale: a go-control-plane (v0.14.0) ADS server that pushes one large
// snapshot (N EDS clusters and their ClusterLoadAssignments) to the proxy
// that connects as node "bench", and reports how long the proxy took to
// ACK it: push-to-ACK for CDS and for EDS, SotW or Delta, whichever stream
// the proxy opened. Used by bench/xds-scale.sh on Envoy and on Legate.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"sync"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"
)

func main() {
	port := flag.Int("port", 18000, "xDS port")
	clusters := flag.Int("clusters", 10000, "clusters")
	perCluster := flag.Int("endpoints", 10, "endpoints per cluster")
	timeout := flag.Duration("timeout", 120*time.Second, "give up after")
	flag.Parse()

	ctx := context.Background()
	cache := cachev3.NewSnapshotCache(true, cachev3.IDHash{}, nil)
	var mu sync.Mutex
	var pushed time.Time
	acked := map[string]time.Duration{}
	connected := make(chan struct{}, 1)
	done := make(chan struct{})
	ack := func(typeURL string, ok bool) {
		mu.Lock()
		defer mu.Unlock()
		if pushed.IsZero() || !ok {
			return
		}
		if _, seen := acked[typeURL]; !seen {
			acked[typeURL] = time.Since(pushed)
			if len(acked) == 2 {
				close(done)
			}
		}
	}
	cb := serverv3.CallbackFuncs{
		StreamRequestFunc: func(_ int64, r *discoveryv3.DiscoveryRequest) error {
			select {
			case connected <- struct{}{}:
			default:
			}
			ack(r.TypeUrl, r.VersionInfo == "1" && r.ErrorDetail == nil)
			return nil
		},
		StreamDeltaRequestFunc: func(_ int64, r *discoveryv3.DeltaDiscoveryRequest) error {
			select {
			case connected <- struct{}{}:
			default:
			}
			ack(r.TypeUrl, r.ResponseNonce != "" && r.ErrorDetail == nil)
			return nil
		},
	}
	srv := serverv3.NewServer(ctx, cache, cb)
	g := grpc.NewServer(grpc.MaxRecvMsgSize(1<<30), grpc.MaxSendMsgSize(1<<30))
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, srv)
	lis, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", *port))
	if err != nil {
		log.Fatal(err)
	}
	go func() { _ = g.Serve(lis) }()

	cs := make([]types.Resource, 0, *clusters)
	es := make([]types.Resource, 0, *clusters)
	for i := 0; i < *clusters; i++ {
		name := fmt.Sprintf("cluster-%d", i)
		cs = append(cs, &clusterv3.Cluster{
			Name:                 name,
			ConnectTimeout:       durationpb.New(time.Second),
			ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
			EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{EdsConfig: &corev3.ConfigSource{
				ResourceApiVersion:    corev3.ApiVersion_V3,
				ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
			}},
		})
		eps := make([]*endpointv3.LbEndpoint, 0, *perCluster)
		for j := 0; j < *perCluster; j++ {
			n := i**perCluster + j
			eps = append(eps, &endpointv3.LbEndpoint{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
					Address:       fmt.Sprintf("10.%d.%d.%d", (n>>16)&255, (n>>8)&255, n&255),
					PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 8080},
				}}},
			}}})
		}
		es = append(es, &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{LbEndpoints: eps}}})
	}
	snap, err := cachev3.NewSnapshot("1", map[resourcev3.Type][]types.Resource{
		resourcev3.ClusterType:  cs,
		resourcev3.EndpointType: es,
	})
	if err != nil {
		log.Fatal(err)
	}

	select {
	case <-connected:
	case <-time.After(*timeout):
		log.Fatal("no proxy connected")
	}
	mu.Lock()
	pushed = time.Now()
	mu.Unlock()
	if err := cache.SetSnapshot(ctx, "bench", snap); err != nil {
		log.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(*timeout):
		log.Fatal("the proxy did not ACK the snapshot in time")
	}
	mu.Lock()
	out, _ := json.Marshal(map[string]any{
		"clusters":        *clusters,
		"endpoints":       *clusters * *perCluster,
		"cds_ack_ms":      acked[resourcev3.ClusterType].Milliseconds(),
		"eds_ack_ms":      acked[resourcev3.EndpointType].Milliseconds(),
		"push_to_ack_ms":  max(acked[resourcev3.ClusterType], acked[resourcev3.EndpointType]).Milliseconds(),
	})
	mu.Unlock()
	fmt.Println(string(out))
	// Stay up so the caller can measure the proxy's memory while connected.
	time.Sleep(3 * time.Second)
}
