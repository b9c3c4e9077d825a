/*
 * answer_floor.c: the C comparator for scripts/bench_answer.py.
 *
 * Serves page requests the least a source can: wait in poll for the return
 * path, recv a request, pread the page from the snapshot file, sendmsg its
 * 8-byte header and the page to the answer socket.  The time from the recv's
 * return to the sendmsg's is one request's service, as uffdpy's
 * request_service_us counts it; the sendmsg alone is timed too.
 *
 *   answer_floor.bin <request_fd> <answer_fd> <snapshot> <pages_offset>
 *
 * reads 16-byte REQ_PAGES messages (big-endian type, length, start, size;
 * the first, REQ_PAGES_ID, names the block and is longer) until the peer
 * closes, then prints one line:
 *
 *   service <n> <p50_ns> <p90_ns> <p99_ns> sendmsg <p50_ns> <p90_ns> <p99_ns>
 *
 * Built by the script with the system compiler only when one exists; the
 * package itself never compiles anything.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_REQUESTS 100000

static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int by_value(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static void print_quantiles(const char *name, int64_t *v, int n)
{
    qsort(v, n, sizeof *v, by_value);
    printf("%s %lld %lld %lld", name, (long long)v[n / 2], (long long)v[n * 9 / 10],
           (long long)v[n * 99 / 100]);
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s REQUEST_FD ANSWER_FD SNAPSHOT PAGES_OFFSET\n", argv[0]);
        return 2;
    }
    int req = atoi(argv[1]), ans = atoi(argv[2]);
    int fd = open(argv[3], O_RDONLY);
    uint64_t pages_offset = strtoull(argv[4], NULL, 0);
    if (fd < 0) {
        perror(argv[3]);
        return 1;
    }
    static int64_t service[MAX_REQUESTS], send_only[MAX_REQUESTS];
    static unsigned char buf[65536];
    static char page[4096];
    size_t held = 0;                  /* bytes of buf not parsed yet */
    int n = 0;
    struct pollfd p = { req, POLLIN, 0 };
    for (;;) {
        if (poll(&p, 1, -1) < 0)
            return 1;
        ssize_t got = recv(req, buf + held, sizeof buf - held, 0);
        if (got <= 0)
            break;
        int64_t t0 = now_ns();
        held += got;
        size_t at = 0;
        /* every whole message read: be16 type, be16 length, then be64 start, be32 size */
        while (held - at >= 4 && held - at >= 4u + ((buf[at + 2] << 8) | buf[at + 3])) {
            size_t length = 4u + ((buf[at + 2] << 8) | buf[at + 3]);
            uint64_t start;
            memcpy(&start, buf + at + 4, 8);
            start = be64toh(start);
            at += length;
            if (pread(fd, page, sizeof page, pages_offset + start) != sizeof page) {
                fprintf(stderr, "short read at %llu\n", (unsigned long long)start);
                return 1;
            }
            uint64_t header = htobe64(start | 0x28);   /* RAM_SAVE_FLAG_PAGE | CONTINUE */
            struct iovec iov[2] = { { &header, 8 }, { page, sizeof page } };
            struct msghdr msg = { .msg_iov = iov, .msg_iovlen = 2 };
            int64_t t1 = now_ns();
            if (sendmsg(ans, &msg, MSG_NOSIGNAL) != 8 + (ssize_t)sizeof page)
                return 1;
            int64_t t2 = now_ns();
            if (n < MAX_REQUESTS) {
                service[n] = t2 - t0;
                send_only[n] = t2 - t1;
                n++;
            }
        }
        memmove(buf, buf + at, held - at);
        held -= at;
    }
    if (n == 0)
        return 1;
    printf("service %d ", n);
    print_quantiles("", service, n);
    print_quantiles(" sendmsg", send_only, n);
    printf("\n");
    return 0;
}
