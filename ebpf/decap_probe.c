/* Probe for `netagent doctor`: can bpf_skb_adjust_room() strip a UDP tunnel and reset the packet's
 * tunnel GSO state (ADJ_ROOM_DECAP_L4_UDP, passed in by the doctor) the way a VXLAN device does? The
 * fast path decapsulates GSO aggregates itself only where it can; elsewhere they take the device.
 *
 * Run on the doctor's VXLAN frame (IPv4, UDP to PROBE_PORT); anything else crossing the link (IPv6
 * autoconfiguration) is dropped untouched. outcome[0]: 1 if the call with the flag was accepted, else
 * its negative errno; outcome[1], only when it was refused: the same for the call without the flag
 * (the control: this frame can be stripped). outcome[0] is written last, so that a reader who sees it
 * set sees outcome[1] too.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/udp.h>

#define VXLAN_ENCAP_LEN 50 /* outer IPv4, UDP, VXLAN, inner Ethernet */

BPF_ARRAY(outcome, long, 2);

static __always_inline void record(int slot, long err) {
    long *value = outcome.lookup(&slot);
    if (value)
        *value = err ? err : 1;
}

int probe(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = (void *)(eth + 1);
    struct udphdr *udp = (void *)(ip + 1);
    if ((void *)(udp + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->protocol != IPPROTO_UDP ||
        udp->dest != bpf_htons(PROBE_PORT))
        return TC_ACT_SHOT;
    long err = bpf_skb_adjust_room(skb, -VXLAN_ENCAP_LEN, BPF_ADJ_ROOM_MAC,
                                   BPF_F_ADJ_ROOM_FIXED_GSO | ADJ_ROOM_DECAP_L4_UDP);
    if (err) /* refused: nothing was stripped, so the control sees the same frame */
        record(1, bpf_skb_adjust_room(skb, -VXLAN_ENCAP_LEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO));
    record(0, err);
    return TC_ACT_SHOT;
}
