/*
 * A disk whose flush is slow, for benchmarks: preloaded into the embedded Postgres
 * (scripts/bench with BENCH_FSYNC_DELAY_US), it adds SLOW_FSYNC_US microseconds to every
 * fsync and fdatasync, as a network-attached volume (Fly.io's, a cloud disk) takes 1-3 ms
 * where this machine's local disk takes 0.1-0.4 ms. Everything else is the real call.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>

static void pause_configured(void) {
	const char *v = getenv("SLOW_FSYNC_US");
	long us = v ? atol(v) : 0;
	if (us > 0) {
		struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
		nanosleep(&ts, NULL);
	}
}

int fdatasync(int fd) {
	static int (*real)(int);
	if (!real)
		real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
	pause_configured();
	return real(fd);
}

int fsync(int fd) {
	static int (*real)(int);
	if (!real)
		real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
	pause_configured();
	return real(fd);
}
