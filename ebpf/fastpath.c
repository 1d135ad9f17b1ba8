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
 * leaves packets of a recorded flow to the stack. A pod-addressed packet it passes to the stack only
 * because the neighbour is not resolved yet carries the mark too: the first packet to a new pod is
 * no reason to give its whole connection the slow path. The map is pinned at PIN_PATH so a restarted agent
 * keeps it, and the loader seeds a new one from conntrack's DNAT entries (flows NATed before the fast
 * path was attached). It is an LRU: an entry is refreshed by every stack-path packet of its flow; one
 * idle long enough to be evicted by 262,144 newer flows is re-recorded by its next outgoing packet.
 *
 * VXLAN (compiled in when VXLAN_VNI is defined): sending a pod's packet through the VXLAN device costs
 * the device's transmit path and a second trip through the IP stack for the outer packet, and the
 * receiving node pays the UDP socket, the device and GRO cells before the inner packet even reaches
 * routing. forward() therefore encapsulates itself (the same headers the device would write: outer IPv4
 * and UDP to the remote node's VTEP, the VNI, an inner Ethernet header with the VTEP MACs) and hands the
 * result to the underlay interface; receive_vxlan(), at tc ingress of the underlay interface, strips the
 * encapsulation of packets for a local pod and hands them to the pod's veth. The remote node's address
 * comes from `vteps`, the VXLAN device's forwarding table mirrored by the agent; a packet whose VTEP is
 * not there, or whose source is not the node that VTEP belongs to, is left to the device. The pod's veth
 * comes from `local_pods`, learned from the pods' own packets and trusted only when its MAC is the one
 * the neighbour table holds for the address. A GSO aggregate (a GRO-merged or locally built TCP
 * super-packet) is stripped only if the kernel can also reset its UDP-tunnel GSO state, as the device
 * does; otherwise, flagged as tunnelled with stale inner-header offsets, it could mislead a NIC's
 * offloads should a pod forward it, so it is left to the device.
 *
 * Compiled by bcc with: CLUSTER_NET / CLUSTER_MASK (host byte order), BRIDGE_IFINDEX, UPLINK_IFINDEX,
 * FAST_MARK (a skb->mark bit), PIN_PATH; for VXLAN also VXLAN_VNI, VXLAN_PORT, VTEP_MAC (an array
 * initialiser), NODE_IP (network byte order as loaded), UNDERLAY_IFINDEX and ADJ_ROOM_DECAP_L4_UDP
 * (newer than the kernel headers bcc compiles against: resets a decapsulated packet's UDP-tunnel GSO
 * state, as the VXLAN device does; kernels without it refuse the call with -EINVAL).
 */
#include <uapi/asm-generic/errno-base.h>
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/if_packet.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/udp.h>

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

/* The IPv4 header and ports of an unfragmented TCP/UDP packet without IP options after `eth`, or NULL. */
static __always_inline struct iphdr *parse(struct ethhdr *eth, void *end, struct ports **ports) {
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

/* Between two pods, TCP or UDP, not a flow whose replies the stack must un-NAT. */
static __always_inline int fast_eligible(struct iphdr *ip, struct ports *ports) {
    /* both ends pods: a host-network peer (a node, an API server endpoint) may be NATed by the stack
     * in ways pod-to-pod records do not cover, so its packets keep the stack */
    if (!in_cluster(ip->saddr) || !in_cluster(ip->daddr) || ip->ttl <= 1)
        return 0;
    struct flow key = {.saddr = ip->saddr, .daddr = ip->daddr, .sport = ports->source,
                       .dport = ports->dest, .protocol = ip->protocol};
    return stack_flows.lookup(&key) == NULL;
}

/* The stack's routing decision for the packet as if it arrived on `ifindex`: a BPF_FIB_LKUP_RET_*
 * code. tot_len: the length to check against the MTU, 0 for the skb's own (GSO aware, but that of the
 * whole, still encapsulated packet on the receive side). */
static __always_inline long route(struct __sk_buff *skb, struct iphdr *ip, struct ports *ports, __u32 ifindex,
                                 __u16 tot_len, struct bpf_fib_lookup *fib) {
    fib->family = AF_INET;
    fib->tos = ip->tos;
    fib->l4_protocol = ip->protocol;
    fib->sport = ports->source;
    fib->dport = ports->dest;
    fib->tot_len = tot_len;
    fib->ipv4_src = ip->saddr;
    fib->ipv4_dst = ip->daddr;
    fib->ifindex = ifindex;
    return bpf_fib_lookup(skb, fib, sizeof(*fib), 0);
}

/* ip_decrease_ttl(): the TTL and an incremental update of the header checksum */
static __always_inline void decrease_ttl(struct iphdr *ip) {
    __u32 check = ip->check;
    check += bpf_htons(0x0100);
    ip->check = (__u16)(check + (check >= 0xFFFF));
    ip->ttl--;
}

static __always_inline void set_macs(struct ethhdr *eth, struct bpf_fib_lookup *fib) {
    __builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
}

#ifdef VXLAN_VNI
struct mac {
    __u8 addr[ETH_ALEN];
    __u8 pad[2];
};

struct local_pod {
    __u32 ifindex; /* its host-side veth */
    __u8 mac[ETH_ALEN];
    __u8 pad[2];
};

/* remote VTEP MAC -> the underlay address of its node */
BPF_HASH(vteps, struct mac, __be32, 8192); /* Kubernetes supports 5,000 nodes */
/* [0]: set once this kernel refused ADJ_ROOM_DECAP_L4_UDP, so GSO packets go to the device at once */
BPF_ARRAY(decap_refused, __u32, 1);
/* pod address -> its veth and MAC, as its own packets showed them */
BPF_TABLE("lru_hash", __be32, struct local_pod, local_pods, 16384);

struct vxlan_encap {
    struct iphdr ip;
    struct udphdr udp;
    __be32 flags;
    __be32 vni;
    struct ethhdr inner;
} __attribute__((packed));

#define VXLAN_FLAG_VNI bpf_htonl(0x08000000) /* "the VNI is valid"; every other bit must be zero */
/* FIXED_GSO: the pod's TCP already sized its segments for the VXLAN MTU (and the receiving side must
 * not grow them back) */
#define ENCAP_FLAGS (BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | \
                     BPF_F_ADJ_ROOM_ENCAP_L2_ETH | ((__u64)ETH_HLEN << 56) /* BPF_F_ADJ_ROOM_ENCAP_L2 */)
#define ECN_MASK 3
#define ECN_CE 3
#define SOURCE_PORT_MIN 32768 /* the kernel's default local port range, as the VXLAN device uses */
#define SOURCE_PORTS 28232

static __always_inline int same_mac(const __u8 *a, const __u8 *b) {
    int differ = 0;
#pragma unroll
    for (int i = 0; i < ETH_ALEN; i++)
        differ |= a[i] ^ b[i];
    return !differ;
}

static __always_inline void learn_local_pod(struct __sk_buff *skb, struct ethhdr *eth, __be32 addr) {
    struct local_pod seen = {.ifindex = skb->ingress_ifindex};
    __builtin_memcpy(seen.mac, eth->h_source, ETH_ALEN);
    struct local_pod *known = local_pods.lookup(&addr);
    if (!known || known->ifindex != seen.ifindex || !same_mac(known->mac, seen.mac))
        local_pods.update(&addr, &seen);
}

/* The one's-complement sum of an IPv4 header without options: the checksum to write when its check
 * field is 0, and 0 when the header is intact. */
static __always_inline __u16 ipv4_checksum(struct iphdr *ip) {
    __u16 *word = (__u16 *)ip;
    __u32 sum = 0;
#pragma unroll
    for (int i = 0; i < (int)sizeof(*ip) / 2; i++)
        sum += word[i];
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    return (__u16)~sum;
}

/* Wrap the routed packet (inner MACs from `fib`) in VXLAN for the VTEP `fib` chose and send it to the
 * underlay; -1 leaves it to the device (a VTEP not yet mirrored, an unresolved underlay neighbour). */
static __always_inline int encapsulate(struct __sk_buff *skb, struct iphdr *inner, struct bpf_fib_lookup *fib) {
    struct mac vtep = {};
    __builtin_memcpy(vtep.addr, fib->dmac, ETH_ALEN);
    __be32 *node = vteps.lookup(&vtep);
    if (!node)
        return -1;
    __u32 outer_len = skb->len - ETH_HLEN + sizeof(struct vxlan_encap);
    struct bpf_fib_lookup underlay = {.family = AF_INET, .l4_protocol = IPPROTO_UDP, .ipv4_src = NODE_IP,
                                      .ipv4_dst = *node, .ifindex = UNDERLAY_IFINDEX,
                                      .tot_len = skb->gso_size ? 0 : outer_len /* a GSO packet's segments fit */};
    if (bpf_fib_lookup(skb, &underlay, sizeof(underlay), BPF_FIB_LOOKUP_OUTPUT) != BPF_FIB_LKUP_RET_SUCCESS ||
        underlay.ifindex != UNDERLAY_IFINDEX)
        return -1;

    /* ECN as the device does it (RFC 6040): the outer header is ECN-capable when the inner one is */
    __u8 ecn = inner->tos & ECN_MASK;
    struct vxlan_encap h = {
        .ip = {.version = 4, .ihl = 5, .ttl = 64, .protocol = IPPROTO_UDP, .tot_len = bpf_htons(outer_len),
               .tos = ecn == ECN_CE ? 2 /* ECT(0) */ : ecn,
               .id = (__u16)bpf_get_prandom_u32(), .saddr = NODE_IP, .daddr = *node},
        /* the source port spreads flows over the underlay's ECMP paths and receive queues */
        .udp = {.source = bpf_htons(SOURCE_PORT_MIN + bpf_get_hash_recalc(skb) % SOURCE_PORTS),
                .dest = bpf_htons(VXLAN_PORT), .len = bpf_htons(outer_len - sizeof(struct iphdr))},
        .flags = VXLAN_FLAG_VNI,
        .vni = bpf_htonl(VXLAN_VNI << 8),
        .inner = {.h_proto = bpf_htons(ETH_P_IP)},
    };
    h.ip.check = ipv4_checksum(&h.ip);
    __builtin_memcpy(h.inner.h_dest, fib->dmac, ETH_ALEN);
    __builtin_memcpy(h.inner.h_source, fib->smac, ETH_ALEN);
    if (bpf_skb_adjust_room(skb, sizeof(h), BPF_ADJ_ROOM_MAC, ENCAP_FLAGS))
        return -1; /* nothing changed */
    struct ethhdr outer = {.h_proto = bpf_htons(ETH_P_IP)};
    set_macs(&outer, &underlay);
    if (bpf_skb_store_bytes(skb, 0, &outer, sizeof(outer), 0) ||
        bpf_skb_store_bytes(skb, sizeof(outer), &h, sizeof(h), 0))
        return TC_ACT_SHOT;
    return bpf_redirect(UNDERLAY_IFINDEX, 0);
}

int receive_vxlan(struct __sk_buff *skb) {
    int zero = 0;
    __u32 *refused = decap_refused.lookup(&zero);
    if (skb->pkt_type != PACKET_HOST || !refused || (skb->gso_size && *refused))
        return TC_ACT_OK;
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    struct vxlan_encap *h = (void *)(eth + 1);
    if ((void *)(h + 1) > end || h->ip.version != 4 || h->ip.ihl != 5 || h->ip.protocol != IPPROTO_UDP ||
        h->ip.daddr != NODE_IP || (h->ip.frag_off & bpf_htons(FRAGMENT_BITS)) ||
        h->udp.dest != bpf_htons(VXLAN_PORT) || h->flags != VXLAN_FLAG_VNI || h->vni != bpf_htonl(VXLAN_VNI << 8))
        return TC_ACT_OK;
    /* a damaged outer header, or a congestion mark to carry over: the device's checks and RFC 6040 */
    if (ipv4_checksum(&h->ip) || (h->ip.tos & ECN_MASK) == ECN_CE)
        return TC_ACT_OK;
    __u8 own_vtep[ETH_ALEN] = VTEP_MAC;
    if (!same_mac(h->inner.h_dest, own_vtep))
        return TC_ACT_OK;
    /* only from the address of the node the sending VTEP belongs to: other packets, which the device
     * would take from anyone, keep going through the stack and so the node's INPUT rules. (The check
     * is on addresses, which a host on the underlay can forge, as it can for the device.) */
    struct mac vtep = {};
    __builtin_memcpy(vtep.addr, h->inner.h_source, ETH_ALEN);
    __be32 *node = vteps.lookup(&vtep);
    if (!node || *node != h->ip.saddr)
        return TC_ACT_OK;
    struct ports *ports;
    struct iphdr *ip = parse(&h->inner, end, &ports);
    if (!ip || !fast_eligible(ip, ports))
        return TC_ACT_OK;
    struct bpf_fib_lookup fib = {};
    __u16 inner_len = skb->gso_size ? 0 : bpf_ntohs(ip->tot_len); /* a GSO packet's segments fit */
    if (route(skb, ip, ports, UPLINK_IFINDEX, inner_len, &fib) != BPF_FIB_LKUP_RET_SUCCESS ||
        fib.ifindex != BRIDGE_IFINDEX)
        return TC_ACT_OK;
    __be32 daddr = ip->daddr;
    struct local_pod *pod = local_pods.lookup(&daddr);
    if (!pod || !same_mac(pod->mac, fib.dmac))
        return TC_ACT_OK;
    __u32 pod_veth = pod->ifindex;

    /* Strip the encapsulation. A kernel that cannot reset the tunnel GSO state leaves GSO packets to
     * the device: marked as tunnelled, with stale inner-header offsets, they would mislead a NIC's
     * offloads if a pod forwarded them on. */
    long err = -EINVAL;
    if (!*refused) {
        err = bpf_skb_adjust_room(skb, -(int)sizeof(struct vxlan_encap), BPF_ADJ_ROOM_MAC,
                                  BPF_F_ADJ_ROOM_FIXED_GSO | ADJ_ROOM_DECAP_L4_UDP);
        if (err == -EINVAL) /* this kernel lacks the flag; other errors concern this packet only */
            *refused = 1;
    }
    if (err == -EINVAL && !skb->gso_size) /* a single packet has no tunnel GSO state to reset */
        err = bpf_skb_adjust_room(skb, -(int)sizeof(struct vxlan_encap), BPF_ADJ_ROOM_MAC,
                                  BPF_F_ADJ_ROOM_FIXED_GSO);
    if (err)
        return TC_ACT_OK;
    data = (void *)(long)skb->data;
    end = (void *)(long)skb->data_end;
    eth = data;
    ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end)
        return TC_ACT_SHOT;
    decrease_ttl(ip);
    set_macs(eth, &fib);
    return bpf_redirect(pod_veth, 0); /* straight to the pod's veth, skipping the bridge */
}
#endif

int forward(struct __sk_buff *skb) {
    /* the interface the stack would route from: the bridge for a pod's packet */
    int from_uplink = skb->ingress_ifindex == UPLINK_IFINDEX;
    /* the stack routes what the uplink receives only when addressed to this host (a pod's veth has
     * its own MAC, the pod addresses the bridge: its packets are not PACKET_HOST there) */
    if (from_uplink && skb->pkt_type != PACKET_HOST)
        return TC_ACT_OK;
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ports *ports;
    struct iphdr *ip = parse(data, end, &ports);
    if (!ip)
        return TC_ACT_OK;
#ifdef VXLAN_VNI
    if (!from_uplink && in_cluster(ip->saddr))
        learn_local_pod(skb, data, ip->saddr);
#endif
    if (!fast_eligible(ip, ports))
        return TC_ACT_OK;
    struct bpf_fib_lookup fib = {};
    long routed = route(skb, ip, ports, from_uplink ? UPLINK_IFINDEX : BRIDGE_IFINDEX, 0, &fib);
    /* only between pods and the uplink: pod to pod on this node stays on the bridge */
    if (fib.ifindex != (from_uplink ? BRIDGE_IFINDEX : UPLINK_IFINDEX))
        return TC_ACT_OK;
    if (routed == BPF_FIB_LKUP_RET_NO_NEIGH) {
        /* the stack only resolves the neighbour (it queues the packet meanwhile) and NATs nothing
         * addressed to a pod (unless an externalIP or load-balancer IP lies in the cluster CIDR, which
         * the fast path bypasses anyway), so note_stack_flow() must not give it the rest of the flow */
        skb->mark |= FAST_MARK;
        return TC_ACT_OK;
    }
    if (routed != BPF_FIB_LKUP_RET_SUCCESS)
        return TC_ACT_OK;

    /* bpf_fib_lookup may not touch packet data, but re-check the bounds for the verifier */
    data = (void *)(long)skb->data;
    end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end)
        return TC_ACT_OK;
    decrease_ttl(ip);
#ifdef VXLAN_VNI
    if (!from_uplink) {
        int verdict = encapsulate(skb, ip, &fib);
        if (verdict >= 0)
            return verdict;
        data = (void *)(long)skb->data; /* unchanged, but the verifier forgets packet pointers */
        end = (void *)(long)skb->data_end;
        eth = data;
        if ((void *)(eth + 1) > end)
            return TC_ACT_SHOT;
    }
#endif
    set_macs(eth, &fib);
    skb->mark |= FAST_MARK;
    return bpf_redirect(fib.ifindex, 0);
}

int note_stack_flow(struct __sk_buff *skb) {
    if (skb->mark & FAST_MARK) {
        skb->mark &= ~FAST_MARK;
        return TC_ACT_OK;
    }
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ports *ports;
    struct iphdr *ip = parse(data, end, &ports);
    if (!ip || !in_cluster(ip->saddr) || !in_cluster(ip->daddr))
        return TC_ACT_OK;
    struct flow reply = {.saddr = ip->daddr, .daddr = ip->saddr, .sport = ports->dest,
                         .dport = ports->source, .protocol = ip->protocol};
    __u8 seen = 1;
    stack_flows.update(&reply, &seen);
    return TC_ACT_OK;
}
