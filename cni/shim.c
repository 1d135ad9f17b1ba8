/*
 * netagent CNI shim: the executable the container runtime runs per pod.
 *
 * Starting Python costs more than a whole ADD in the reference Go plugins, so this client only
 * forwards the request (CNI_* environment + stdin) to the running netagent agent over a root-only
 * unix socket, prints the agent's answer and exits with its code. When no agent answers the
 * connect(), it execs the full Python plugin with the same environment and the same stdin bytes
 * (replayed through a memfd), so the agent being down costs speed, never correctness.
 *
 * Wire protocol: see netagent/cni_service.py. Build: cc -O2 -DNETAGENT_SOCKET='"..."'
 * -DNETAGENT_FALLBACK='"..."' -o netagent shim.c (done by `netagent install-cni`).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef NETAGENT_SOCKET
#define NETAGENT_SOCKET "/run/netagent/cni.sock"
#endif
#ifndef NETAGENT_FALLBACK
#define NETAGENT_FALLBACK "/usr/local/bin/netagent-cni"
#endif

extern char **environ;

struct buffer {
    char *data;
    size_t len, cap;
};

/* Print a CNI error object (spec format) and exit non-zero. */
static void fail(int code, const char *msg, const char *details) {
    printf("{\"cniVersion\":\"1.0.0\",\"code\":%d,\"msg\":\"%s\",\"details\":\"%s\"}\n", code, msg, details);
    fflush(stdout);
    exit(1);
}

static void append(struct buffer *b, const void *data, size_t len) {
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len) cap *= 2;
        b->data = realloc(b->data, cap);
        if (!b->data) fail(5, "netagent shim: out of memory", "");
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

static void append_u32(struct buffer *b, uint32_t value) {
    unsigned char be[4] = {value >> 24, value >> 16, value >> 8, value};
    append(b, be, sizeof be);
}

static int read_all(int fd, struct buffer *b) {
    char chunk[65536];
    for (;;) {
        ssize_t n = read(fd, chunk, sizeof chunk);
        if (n == 0) return 0;
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        append(b, chunk, (size_t)n);
    }
}

static int write_all(int fd, const char *data, size_t len) {
    while (len) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        data += n;
        len -= (size_t)n;
    }
    return 0;
}

static int connect_agent(void) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(NETAGENT_SOCKET) >= sizeof addr.sun_path) return -1;
    strcpy(addr.sun_path, NETAGENT_SOCKET);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* No agent: run the Python plugin with our environment and the stdin we already consumed. */
static void exec_fallback(char **argv, const struct buffer *stdin_bytes) {
    int memfd = memfd_create("netagent-cni-stdin", 0);
    if (memfd < 0) fail(5, "netagent shim: memfd_create failed", strerror(errno));
    if (stdin_bytes->len && write(memfd, stdin_bytes->data, stdin_bytes->len) != (ssize_t)stdin_bytes->len)
        fail(5, "netagent shim: cannot buffer stdin for the fallback plugin", strerror(errno));
    if (lseek(memfd, 0, SEEK_SET) < 0 || dup2(memfd, 0) < 0)
        fail(5, "netagent shim: cannot replay stdin", strerror(errno));
    close(memfd);
    argv[0] = NETAGENT_FALLBACK;
    execv(NETAGENT_FALLBACK, argv);
    fail(50, "netagent agent not reachable and the fallback plugin " NETAGENT_FALLBACK " cannot run",
         strerror(errno));
}

int main(int argc, char **argv) {
    (void)argc;
    struct buffer stdin_bytes = {0}, request = {0}, env = {0};
    if (read_all(0, &stdin_bytes) < 0) fail(5, "netagent shim: cannot read stdin", strerror(errno));

    int fd = connect_agent();
    if (fd < 0) exec_fallback(argv, &stdin_bytes);

    for (char **e = environ; *e; e++)
        if (strncmp(*e, "CNI_", 4) == 0) append(&env, *e, strlen(*e) + 1);
    append(&request, "NAC1", 4);
    append_u32(&request, (uint32_t)env.len);
    append(&request, env.data, env.len);
    append_u32(&request, (uint32_t)stdin_bytes.len);
    append(&request, stdin_bytes.data, stdin_bytes.len);
    if (write_all(fd, request.data, request.len) < 0)
        fail(11, "netagent shim: the agent dropped the request; try again", strerror(errno));

    struct buffer reply = {0};
    if (read_all(fd, &reply) < 0 || reply.len < 4) fail(11, "netagent shim: the agent closed the connection without an answer", "");
    const unsigned char *h = (const unsigned char *)reply.data;
    int code = (int)(((uint32_t)h[0] << 24) | ((uint32_t)h[1] << 16) | ((uint32_t)h[2] << 8) | h[3]);
    if (reply.len > 4 && fwrite(reply.data + 4, 1, reply.len - 4, stdout) != reply.len - 4)
        fail(5, "netagent shim: cannot write the result", strerror(errno));
    fflush(stdout);
    return code;
}
