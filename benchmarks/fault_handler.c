/*
 * fault_handler.c: the C comparator for scripts/bench_fault.py.
 *
 * Measures the same things as the Python benchmark, the same way, so that
 * the script can print Python/C ratios from one run:
 *
 *   lat <op> <placement> <p50_ns> <p90_ns> <p99_ns>
 *       per-fault latency seen by a toucher thread (pinned to CPU 0) reading
 *       one byte of each page of a registered region in random order, while
 *       a handler thread serves each fault with one single-page UFFDIO_COPY
 *       or UFFDIO_ZEROPAGE.  Placements: "same" (handler on CPU 0, sleeping
 *       in poll), "poll" (handler on CPU 1, sleeping in poll), "busy"
 *       (handler on CPU 1, spinning on non-blocking read); with a "proc-"
 *       prefix the handler is a forked child process instead of a thread
 *       (the uffd still covers the parent's memory), as uffdpy's process
 *       server runs it.  With <region_pages>, the region has that many
 *       pages and <faults> distinct ones of them are touched, in random
 *       order: sparse faults, as a loader's random accesses to a large guest
 *       are (each may need a new page-table page).
 *   bulk <chunk_bytes> <GB_per_s>
 *       UFFDIO_COPY of a whole registered region in chunks (median of 3
 *       runs after a warm-up), no faults involved.
 *
 * Usage: fault_handler.bin <faults> <bulk_mib>          every row
 *        fault_handler.bin <faults> lat <op> <placement> [<region_pages>]
 *                                                         one latency row
 *        fault_handler.bin <bulk_mib> bulk <chunk_bytes>  one bulk row
 * (the script runs single rows, interleaved with its own).
 * Built by the script with the system compiler only when one exists; the
 * package itself never compiles anything.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void pin(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set))
		die("sched_setaffinity");
}

static int new_uffd(void)
{
	struct uffdio_api api = { .api = UFFD_API };
	int fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);

	if (fd < 0)
		die("userfaultfd");
	if (ioctl(fd, UFFDIO_API, &api))
		die("UFFDIO_API");
	return fd;
}

static void *map_region(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);

	if (p == MAP_FAILED)
		die("mmap");
	return p;
}

static void register_range(int uffd, void *p, size_t len)
{
	struct uffdio_register reg = {
		.range = { .start = (uintptr_t)p, .len = len },
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};

	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		die("UFFDIO_REGISTER");
}

struct handler {
	int uffd, stopfd, cpu, busy, zeropage;
	char *src;
	volatile int stop;
};

static void serve(struct handler *h, struct uffd_msg *msgs, ssize_t n)
{
	for (ssize_t i = 0; i < n / (ssize_t)sizeof(*msgs); i++) {
		uint64_t addr = msgs[i].arg.pagefault.address;

		if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
			continue;
		if (h->zeropage) {
			struct uffdio_zeropage z = { .range = { addr, PAGE } };

			if (ioctl(h->uffd, UFFDIO_ZEROPAGE, &z) && errno != EEXIST)
				die("UFFDIO_ZEROPAGE");
		} else {
			struct uffdio_copy c = { .dst = addr, .src = (uintptr_t)h->src,
						 .len = PAGE };

			if (ioctl(h->uffd, UFFDIO_COPY, &c) && errno != EEXIST)
				die("UFFDIO_COPY");
		}
	}
}

static void *handler_main(void *arg)
{
	struct handler *h = arg;
	struct uffd_msg msgs[64];
	struct pollfd fds[2] = { { h->uffd, POLLIN, 0 }, { h->stopfd, POLLIN, 0 } };

	pin(h->cpu);
	for (;;) {
		ssize_t n;

		if (h->busy) {
			if (h->stop)
				break;
		} else {
			if (poll(fds, 2, -1) < 0)
				die("poll");
			if (fds[1].revents)
				break;
		}
		n = read(h->uffd, msgs, sizeof(msgs));
		if (n < 0) {
			if (errno == EAGAIN)
				continue;
			die("read");
		}
		serve(h, msgs, n);
	}
	return NULL;
}

struct toucher {
	char *base;
	size_t *order;
	size_t n;
	uint64_t *lat;
};

static void *toucher_main(void *arg)
{
	struct toucher *t = arg;

	pin(0);
	for (size_t i = 0; i < t->n; i++) {
		volatile char *p = t->base + t->order[i] * PAGE;
		uint64_t t0 = now_ns();

		(void)*p;
		t->lat[i] = now_ns() - t0;
	}
	return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static void latency(size_t faults, size_t pages, int zeropage, const char *placement, int cpu,
		    int busy, int proc, char *src)
{
	size_t len = pages * PAGE, *order = malloc(pages * sizeof(size_t));
	uint64_t *lat = malloc(faults * sizeof(uint64_t));
	char *base = map_region(len);
	int uffd = new_uffd(), stopfd = eventfd(0, EFD_CLOEXEC);
	/* shared, so that a forked handler sees the stop flag */
	struct handler *hp = mmap(NULL, sizeof(*hp), PROT_READ | PROT_WRITE,
				  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	struct toucher t = { base, order, faults, lat };
	pthread_t ht, tt;
	pid_t pid = 0;
	uint64_t one = 1;

	if (!order || !lat || stopfd < 0 || hp == MAP_FAILED)
		die("setup");
	*hp = (struct handler){ uffd, stopfd, cpu, busy, zeropage, src, 0 };
	for (size_t i = 0; i < pages; i++)
		order[i] = i;
	for (size_t i = pages - 1; i > 0; i--) {  /* the first <faults> are touched */
		size_t j = (size_t)random() % (i + 1), tmp = order[i];

		order[i] = order[j];
		order[j] = tmp;
	}
	register_range(uffd, base, len);
	if (proc) {
		pid = fork();
		if (pid < 0)
			die("fork");
		if (pid == 0) {
			handler_main(hp);
			_exit(0);
		}
	} else {
		pthread_create(&ht, NULL, handler_main, hp);
	}
	pthread_create(&tt, NULL, toucher_main, &t);
	pthread_join(tt, NULL);
	hp->stop = 1;
	if (write(stopfd, &one, sizeof(one)) != sizeof(one))
		die("write");
	if (proc) {
		int status;

		if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status))
			die("handler process");
	} else {
		pthread_join(ht, NULL);
	}
	qsort(lat, faults, sizeof(*lat), cmp_u64);
	printf("lat %s %s %llu %llu %llu\n", zeropage ? "zeropage" : "copy", placement,
	       (unsigned long long)lat[faults / 2], (unsigned long long)lat[faults * 9 / 10],
	       (unsigned long long)lat[faults * 99 / 100]);
	fflush(stdout);
	close(uffd);
	close(stopfd);
	munmap(hp, sizeof(*hp));
	munmap(base, len);
	free(order);
	free(lat);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static void bulk(size_t mib, size_t chunk, char *src)
{
	size_t len = mib << 20;
	char *base = map_region(len);
	int uffd = new_uffd();
	double rates[4];

	register_range(uffd, base, len);
	for (int run = 0; run < 4; run++) {
		uint64_t t0 = now_ns();

		for (size_t off = 0; off < len; off += chunk) {
			struct uffdio_copy c = { .dst = (uintptr_t)base + off,
						 .src = (uintptr_t)src + off % (2UL << 20),
						 .len = chunk };

			if (ioctl(uffd, UFFDIO_COPY, &c))
				die("bulk UFFDIO_COPY");
		}
		rates[run] = len / (double)(now_ns() - t0);
		if (madvise(base, len, MADV_DONTNEED))
			die("madvise");
	}
	qsort(rates + 1, 3, sizeof(double), cmp_double);  /* run 0 is the warm-up */
	printf("bulk %zu %.3f\n", chunk, rates[2]);
	fflush(stdout);
	close(uffd);
	munmap(base, len);
}

int main(int argc, char **argv)
{
	size_t faults, mib;
	char *src;
	static const size_t chunks[] = { 4096, 65536, 2UL << 20 };

	if (argc != 3 && !((argc == 5 || argc == 6) && !strcmp(argv[2], "lat"))
	    && !(argc == 4 && !strcmp(argv[2], "bulk")))
		return fprintf(stderr, "usage: %s <faults> <bulk_mib> | <faults> lat <op> "
			       "<placement> [<region_pages>] | <bulk_mib> bulk <chunk>\n",
			       argv[0]), 2;
	src = map_region(2UL << 20);
	memset(src, 0x5a, 2UL << 20);
	srandom(1);
	if (argc == 5 || argc == 6) {
		const char *op = argv[3], *pl = argv[4];
		size_t n = strtoul(argv[1], NULL, 0);
		size_t pages = argc == 6 ? strtoul(argv[5], NULL, 0) : n;
		int proc = !strncmp(pl, "proc-", 5), zp = !strcmp(op, "zeropage");
		const char *base = proc ? pl + 5 : pl;

		if (!zp && strcmp(op, "copy"))
			return fprintf(stderr, "op: copy or zeropage\n"), 2;
		if (strcmp(base, "same") && strcmp(base, "poll") && strcmp(base, "busy"))
			return fprintf(stderr, "placement: [proc-]same, poll or busy\n"), 2;
		if (pages < n || n == 0)
			return fprintf(stderr, "region_pages must be >= faults > 0\n"), 2;
		latency(n, pages, zp, pl, strcmp(base, "same") ? 1 : 0, !strcmp(base, "busy"),
			proc, src);
		return 0;
	}
	if (argc == 4) {
		bulk(strtoul(argv[1], NULL, 0), strtoul(argv[3], NULL, 0), src);
		return 0;
	}
	faults = strtoul(argv[1], NULL, 0);
	mib = strtoul(argv[2], NULL, 0);
	for (int zp = 0; zp < 2; zp++) {
		latency(faults, faults, zp, "same", 0, 0, 0, src);
		latency(faults, faults, zp, "poll", 1, 0, 0, src);
		latency(faults, faults, zp, "busy", 1, 1, 0, src);
	}
	for (int i = 0; i < 3; i++)
		bulk(mib, chunks[i], src);
	return 0;
}
