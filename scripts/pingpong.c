/*
 * The cost of waking a process, for calibrating an instance (scripts/calibrate): two
 * processes pass one byte back and forth over pipes, so each round trip is two wake-ups of a
 * sleeping process. The broker's path is made of such wake-ups (a message crosses the load
 * generator, two replicas and Postgres backends, about 24 context switches), and on a
 * paravirtualised machine their cost varies from one instance to the next far more than a
 * plain loop's or a Postgres query's does.
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
	int n = argc > 1 ? atoi(argv[1]) : 200000;
	if (n <= 0) {
		fprintf(stderr, "usage: pingpong [round trips > 0]\n");
		return 2;
	}
	int a[2], b[2];
	char c = 'x';
	if (pipe(a) || pipe(b)) {
		perror("pipe");
		return 1;
	}
	pid_t child = fork();
	if (child < 0) {
		perror("fork");
		return 1;
	}
	if (child == 0) {
		for (int i = 0; i < n; i++) {
			if (read(a[0], &c, 1) != 1 || write(b[1], &c, 1) != 1)
				_exit(1);
		}
		_exit(0);
	}
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int i = 0; i < n; i++) {
		if (write(a[1], &c, 1) != 1 || read(b[0], &c, 1) != 1) {
			perror("pingpong");
			return 1;
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	waitpid(child, NULL, 0);
	double us = ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / n / 1e3;
	printf("pipe round trip between two processes: %.1f us (two wake-ups)\n", us);
	return 0;
}
