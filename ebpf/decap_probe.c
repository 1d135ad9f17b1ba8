/* Probe for `netagent doctor`: can bpf_skb_adjust_room() strip a UDP tunnel and reset the packet's
 * tunnel GSO state (ADJ_ROOM_DECAP_L4_UDP, passed in by the doctor) the way a VXLAN device does? The
 * fast path decapsulates GSO aggregates itself only where it can; elsewhere they take the device.
 *
 * Run on one VXLAN-shaped frame. outcome[0]: 1 if the call with the flag was accepted, else its
 * negative errno; outcome[1]: the same for the call without the flag (the control: the frame itself
 * can be stripped). The frame is dropped.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#define VXLAN_ENCAP_LEN 50 /* outer IPv4, UDP, VXLAN, inner Ethernet */

BPF_ARRAY(outcome, long, 2);

static __always_inline void record(int slot, long err) {
    long *value = outcome.lookup(&slot);
    if (value)
        *value = err ? err : 1;
}

int probe(struct __sk_buff *skb) {
    long err = bpf_skb_adjust_room(skb, -VXLAN_ENCAP_LEN, BPF_ADJ_ROOM_MAC,
                                   BPF_F_ADJ_ROOM_FIXED_GSO | ADJ_ROOM_DECAP_L4_UDP);
    if (err)
        record(1, bpf_skb_adjust_room(skb, -VXLAN_ENCAP_LEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO));
    record(0, err);
    return TC_ACT_SHOT;
}
