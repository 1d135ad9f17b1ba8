/*
 * netagent CNI shim: the executable the container runtime runs per pod.
 *
 * Starting Python costs more than a whole ADD in the reference Go plugins, so this client only
 * forwards the request (CNI_* environment + stdin) to the running netagent agent over a root-only
 * unix socket, prints the agent's answer and exits with its code. When the agent does not take the
 * request, it execs the full Python plugin with the same environment and the same stdin bytes
 * (replayed through a memfd), so the agent being down or busy costs speed, never correctness.
 *
 * A request must never run twice (a double ADD), so the plugin is exec'd only when the agent
 * provably does not run it: nobody accepts the connection, the agent closes it or stays silent
 * before its greeting (nothing was sent yet), the request cannot be sent whole, or the agent
 * answers DECLINED. Once the agent holds the whole request the shim waits for the answer until the
 * deadline the greeting announced (plus a margin), and otherwise fails: it never blocks for ever.
 *
 * Wire protocol: see netagent/cni_service.py. Build: cc -O2 -DNETAGENT_SOCKET='"..."'
 * -DNETAGENT_FALLBACK='"..."' -o netagent shim.c (done by `netagent install-cni`).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef NETAGENT_SOCKET
#define NETAGENT_SOCKET "/run/netagent/cni.sock"
#endif
#ifndef NETAGENT_FALLBACK
#define NETAGENT_FALLBACK "/usr/local/bin/netagent-cni"
#endif

#define MAGIC "NAC2"
#define DECLINED 0xFFFFFFFFu
#define GREETING_TIMEOUT_MS 5000LL       /* an agent this slow to accept is as good as down */
#define MAX_DEADLINE_MS (600 * 1000LL)   /* whatever a greeting says, never wait longer */
#define TRY_AGAIN_LATER 11

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

static uint32_t u32_at(const char *data) {
    const unsigned char *h = (const unsigned char *)data;
    return ((uint32_t)h[0] << 24) | ((uint32_t)h[1] << 16) | ((uint32_t)h[2] << 8) | h[3];
}

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* Wait until fd is ready for `events` or `deadline` (now_ms() time) passes: 1 ready, 0 timed out. */
static int wait_ready(int fd, short events, long long deadline) {
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int n = poll(&p, 1, left > 60000 ? 60000 : (int)left);
        if (n > 0) return 1;
        if (n < 0 && errno != EINTR) return 1; /* let the read or write report the error */
    }
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

/* Read from the socket into b until it holds at_most bytes or EOF (0), a read error (-1) or
 * `deadline` (1), whichever comes first. */
static int read_by(int fd, struct buffer *b, size_t at_most, long long deadline) {
    char chunk[65536];
    while (b->len < at_most) {
        size_t want = at_most - b->len < sizeof chunk ? at_most - b->len : sizeof chunk;
        ssize_t n = recv(fd, chunk, want, MSG_DONTWAIT);
        if (n == 0) return 0;
        if (n > 0) {
            append(b, chunk, (size_t)n);
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            if (!wait_ready(fd, POLLIN, deadline)) return 1;
        } else if (errno != EINTR) {
            return -1;
        }
    }
    return 0;
}

/* Send all of data by `deadline`: 0 when it was all handed to the agent's socket, -1 otherwise. */
static int send_by(int fd, const char *data, size_t len, long long deadline) {
    while (len) {
        ssize_t n = send(fd, data, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n >= 0) {
            data += n;
            len -= (size_t)n;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            if (!wait_ready(fd, POLLOUT, deadline)) return -1;
        } else if (errno != EINTR) {
            return -1;
        }
    }
    return 0;
}

static int connect_agent(void) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(NETAGENT_SOCKET) >= sizeof addr.sun_path) return -1;
    strcpy(addr.sun_path, NETAGENT_SOCKET);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    /* non-blocking: a full accept queue (an agent that stopped accepting) fails with EAGAIN */
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* The agent does not run this request: run the Python plugin with our environment and stdin. */
static void exec_fallback(int agent, char **argv, const struct buffer *stdin_bytes) {
    if (agent >= 0) close(agent);
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

/* A frame length; one over 4 GiB is sent as the largest, which the agent refuses before reading. */
static uint32_t frame_length(size_t len) {
    return len > UINT32_MAX ? UINT32_MAX : (uint32_t)len;
}

int main(int argc, char **argv) {
    (void)argc;
    struct buffer stdin_bytes = {0}, request = {0}, env = {0}, greeting = {0}, reply = {0};
    if (read_all(0, &stdin_bytes) < 0) fail(5, "netagent shim: cannot read stdin", strerror(errno));

    int fd = connect_agent();
    if (fd < 0) exec_fallback(-1, argv, &stdin_bytes);

    /* the greeting: no request is sent before it, so without it the agent cannot run this one */
    read_by(fd, &greeting, 8, now_ms() + GREETING_TIMEOUT_MS);
    if (greeting.len < 8 || memcmp(greeting.data, MAGIC, 4) != 0) exec_fallback(fd, argv, &stdin_bytes);
    long long deadline_ms = u32_at(greeting.data + 4);
    if (deadline_ms > MAX_DEADLINE_MS) deadline_ms = MAX_DEADLINE_MS;
    long long deadline = now_ms() + deadline_ms + deadline_ms / 4 + 2000;

    for (char **e = environ; *e; e++)
        if (strncmp(*e, "CNI_", 4) == 0) append(&env, *e, strlen(*e) + 1);
    append(&request, MAGIC, 4);
    append_u32(&request, frame_length(env.len));
    append(&request, env.data, env.len);
    append_u32(&request, frame_length(stdin_bytes.len));
    append(&request, stdin_bytes.data, stdin_bytes.len);

    if (send_by(fd, request.data, request.len, deadline) < 0) {
        /* the agent never got the whole request, so it cannot run it; it may have answered what it
         * read (a frame over its limit), which is already queued here if so */
        if (read_by(fd, &reply, SIZE_MAX, now_ms()) == 1 || reply.len < 4)
            exec_fallback(fd, argv, &stdin_bytes);
    } else {
        int status = read_by(fd, &reply, SIZE_MAX, deadline);
        if (status == 1)
            fail(TRY_AGAIN_LATER, "netagent shim: the agent took the request but gave no answer in time",
                 "it may still be running it");
        /* an agent that answers without reading everything we sent (a frame over its limit) resets
         * the connection after its answer: a complete header is an answer */
        if (reply.len < 4)
            fail(TRY_AGAIN_LATER, "netagent shim: the agent closed the connection without an answer", "");
    }
    uint32_t code = u32_at(reply.data);
    if (code == DECLINED) exec_fallback(fd, argv, &stdin_bytes);
    if (reply.len > 4 && fwrite(reply.data + 4, 1, reply.len - 4, stdout) != reply.len - 4)
        fail(5, "netagent shim: cannot write the result", strerror(errno));
    fflush(stdout);
    return (int)code;
}
