/* Pod-to-pod fast path across nodes (IPv4, TCP and UDP), attached with tc on a node's pod bridge and
 * its uplink (the underlay interface in routes mode, the VXLAN device in vxlan mode).
 *
 * A packet between a pod and a remote pod normally crosses the node's bridge and IP stack: the bridge's
 * netfilter hooks, routing, the netfilter hooks again (conntrack included). forward(), at tc ingress
 * of each pod's host-side veth and of the uplink, makes the same routing decision with
 * bpf_fib_lookup() and sends the packet straight to the device the kernel would have used (the uplink
 * for a pod's packet, the bridge for one to a local pod), with the MAC addresses the neighbour table
 * gives and the TTL decremented, as ip_forward() does. Anything it is unsure about is passed to the stack
 * unchanged (TC_ACT_OK): other protocols, IP options, fragments, unresolved neighbours, destinations outside the
 * cluster CIDR, and the flows the stack has NATed.
 *
 * NAT: a connection to a ClusterIP or NodePort is DNATed by the stack (the service proxy), and its
 * replies must go back through the stack to be un-NATed. note_stack_flow() runs at tc egress of the
 * bridge and the uplink and records, for every packet the stack forwarded between a pod and the cluster
 * (i.e. one forward() did not take, which it marks), the reply's 5-tuple in `stack_flows`. forward()
 * leaves packets of a recorded flow to the stack. The map is pinned at PIN_PATH so a restarted agent
 * keeps it, and the loader seeds a new one from conntrack's DNAT entries (flows NATed before the fast
 * path was attached). It is an LRU: an entry is refreshed by every stack-path packet of its flow; one
 * idle long enough to be evicted by 262,144 newer flows is re-recorded by its next outgoing packet.
 *
 * Compiled by bcc with: CLUSTER_NET / CLUSTER_MASK (host byte order), BRIDGE_IFINDEX, UPLINK_IFINDEX,
 * FAST_MARK (a skb->mark bit), PIN_PATH.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_packet.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>

struct flow {
    __be32 saddr;
    __be32 daddr;
    __be16 sport;
    __be16 dport;
    __u8 protocol;
    __u8 pad[3];
};

BPF_TABLE_PINNED("lru_hash", struct flow, __u8, stack_flows, 262144, PIN_PATH);

#define FRAGMENT_BITS 0x3FFF /* IP_MF | IP_OFFSET: set on every fragment of a fragmented packet */

struct ports {
    __be16 source;
    __be16 dest;
};

/* The IPv4 header and ports of an unfragmented TCP/UDP packet without IP options, or NULL. */
static __always_inline struct iphdr *parse(struct __sk_buff *skb, struct ports **ports) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return NULL;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl != 5)
        return NULL;
    if (ip->frag_off & bpf_htons(FRAGMENT_BITS))
        return NULL; /* a fragment: later ones carry no ports, so the stack reassembles or tracks them */
    if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
        return NULL;
    struct ports *p = (void *)(ip + 1);
    if ((void *)(p + 1) > end)
        return NULL;
    *ports = p;
    return ip;
}

static __always_inline int in_cluster(__be32 addr) {
    return (bpf_ntohl(addr) & CLUSTER_MASK) == CLUSTER_NET;
}

int forward(struct __sk_buff *skb) {
    /* the interface the stack would route from: the bridge for a pod's packet */
    int from_uplink = skb->ingress_ifindex == UPLINK_IFINDEX;
    /* the stack routes what the uplink receives only when addressed to this host (a pod's veth has
     * its own MAC, the pod addresses the bridge: its packets are not PACKET_HOST there) */
    if (from_uplink && skb->pkt_type != PACKET_HOST)
        return TC_ACT_OK;
    struct ports *ports;
    struct iphdr *ip = parse(skb, &ports);
    /* both ends pods: a host-network peer (a node, an API server endpoint) may be NATed by the stack
     * in ways pod-to-pod records do not cover, so its packets keep the stack */
    if (!ip || !in_cluster(ip->saddr) || !in_cluster(ip->daddr) || ip->ttl <= 1)
        return TC_ACT_OK;
    struct flow key = {.saddr = ip->saddr, .daddr = ip->daddr, .sport = ports->source,
                       .dport = ports->dest, .protocol = ip->protocol};
    if (stack_flows.lookup(&key))
        return TC_ACT_OK;

    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET;
    fib.tos = ip->tos;
    fib.l4_protocol = ip->protocol;
    fib.sport = ports->source;
    fib.dport = ports->dest;
    fib.tot_len = 0; /* 0: the kernel checks the MTU against the skb (GSO aware) */
    fib.ipv4_src = ip->saddr;
    fib.ipv4_dst = ip->daddr;
    fib.ifindex = from_uplink ? UPLINK_IFINDEX : BRIDGE_IFINDEX;
    if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
        return TC_ACT_OK;
    /* only between pods and the uplink: pod to pod on this node stays on the bridge */
    if (fib.ifindex != (from_uplink ? BRIDGE_IFINDEX : UPLINK_IFINDEX))
        return TC_ACT_OK;

    /* bpf_fib_lookup may not touch packet data, but re-check the bounds for the verifier */
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end)
        return TC_ACT_OK;
    __u32 check = ip->check;
    check += bpf_htons(0x0100); /* ip_decrease_ttl(): incremental checksum update */
    ip->check = (__u16)(check + (check >= 0xFFFF));
    ip->ttl--;
    __builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
    skb->mark |= FAST_MARK;
    return bpf_redirect(fib.ifindex, 0);
}

int note_stack_flow(struct __sk_buff *skb) {
    if (skb->mark & FAST_MARK) {
        skb->mark &= ~FAST_MARK;
        return TC_ACT_OK;
    }
    struct ports *ports;
    struct iphdr *ip = parse(skb, &ports);
    if (!ip || !in_cluster(ip->saddr) || !in_cluster(ip->daddr))
        return TC_ACT_OK;
    struct flow reply = {.saddr = ip->daddr, .daddr = ip->saddr, .sport = ports->dest,
                         .dport = ports->source, .protocol = ip->protocol};
    __u8 seen = 1;
    stack_flows.update(&reply, &seen);
    return TC_ACT_OK;
}
