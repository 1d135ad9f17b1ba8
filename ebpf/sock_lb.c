/* Socket-level load balancing for ClusterIP services (IPv4, TCP and UDP).
 *
 * Attached to a cgroup v2: every connect()/sendmsg() of a process below it that targets a service
 * address is rewritten, before any packet exists, to one of the service's endpoints chosen at random.
 * No NAT and no conntrack entry on the data path: the socket is simply connected to the pod.
 * The reverse translation is done on recvmsg() (UDP replies) and getpeername(), so the application
 * only ever sees the ClusterIP it asked for.
 *
 * The maps are pinned under PIN_DIR (passed by the loader) so they outlive the agent: a restart
 * re-opens them instead of starting empty. The agent writes `services` and `endpoints`; the program
 * only writes `reverse` (a cache, LRU: entries of closed sockets age out on their own; an evicted one
 * only means that socket's getpeername() or replies show the pod's address).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>

#define ALLOW 1
#define REFUSE 0 /* connect()/sendmsg() fail with EPERM: a service without endpoints refuses */

struct service_key {
    __be32 ip;
    __be16 port;
    __u8 protocol; /* IPPROTO_TCP / IPPROTO_UDP */
    __u8 pad;
};

struct service_value {
    __u32 count; /* endpoints in slots 0..count-1; 0 = the service exists but has none */
    __u32 id;
};

struct endpoint_key {
    __u32 service_id;
    __u32 slot;
};

struct endpoint_value {
    __be32 ip;
    __be16 port;
    __u16 pad;
};

struct reverse_key {
    __u64 cookie; /* the socket */
    __be32 ip;    /* the endpoint it talks to */
    __be16 port;
    __u16 pad;
};

BPF_TABLE_PINNED("hash", struct service_key, struct service_value, services, 65536, PIN_DIR "/services");
BPF_TABLE_PINNED("hash", struct endpoint_key, struct endpoint_value, endpoints, 262144, PIN_DIR "/endpoints",
                 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct reverse_key, struct endpoint_value, reverse, 65536, PIN_DIR "/reverse");

/* Rewrites ctx to an endpoint of the service it targets. Returns ALLOW for anything that is not a
 * service (including other protocols), REFUSE for a service without endpoints. */
static __always_inline int pick_endpoint(struct bpf_sock_addr *ctx, int remember)
{
    struct service_key key = {
        .ip = ctx->user_ip4,
        .port = (__be16)ctx->user_port,
        .protocol = (__u8)ctx->protocol,
    };
    struct service_value *service = services.lookup(&key);
    if (!service)
        return ALLOW;
    if (service->count == 0)
        return REFUSE;
    struct endpoint_key slot = {.service_id = service->id, .slot = bpf_get_prandom_u32() % service->count};
    struct endpoint_value *endpoint = endpoints.lookup(&slot);
    if (!endpoint)
        return REFUSE; /* only while the agent shrinks a service: never send to a stale slot */
    if (remember) {
        struct reverse_key rkey = {.cookie = bpf_get_socket_cookie(ctx), .ip = endpoint->ip, .port = endpoint->port};
        struct endpoint_value original = {.ip = key.ip, .port = key.port};
        reverse.update(&rkey, &original);
    }
    ctx->user_ip4 = endpoint->ip;
    ctx->user_port = endpoint->port;
    return ALLOW;
}

int sock4_connect(struct bpf_sock_addr *ctx)
{
    return pick_endpoint(ctx, 1);
}

int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
    return pick_endpoint(ctx, 1);
}

/* Shows the ClusterIP the socket was rewritten from, in place of the endpoint it talks to. */
static __always_inline int restore_service(struct bpf_sock_addr *ctx)
{
    struct reverse_key rkey = {
        .cookie = bpf_get_socket_cookie(ctx),
        .ip = ctx->user_ip4,
        .port = (__be16)ctx->user_port,
    };
    struct endpoint_value *original = reverse.lookup(&rkey);
    if (original) {
        ctx->user_ip4 = original->ip;
        ctx->user_port = original->port;
    }
    return ALLOW; /* these hooks must allow */
}

int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
    return restore_service(ctx);
}

int sock4_getpeername(struct bpf_sock_addr *ctx)
{
    return restore_service(ctx);
}
