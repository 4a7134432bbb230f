// A sampling profiler for the host side of a process (no perf or gdb on the GPU machine): preloaded
// (LD_PRELOAD), it takes the stack of whichever thread is on the CPU every 0.5 ms of the process's CPU
// time (SIGPROF) and, at exit, writes the samples and the process's memory map to $PROF_OUT.<pid>.
// scripts/device/profile/report.py turns a file into self and inclusive shares per function.
// Build: gcc -O1 -shared -fPIC -o sampler.so sampler.c
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>
#define MAXS 400000
#define DEPTH 24
static void* buf[MAXS][DEPTH];
static int depth[MAXS];
static volatile int n;
static void on_prof(int sig) {
  (void)sig;
  int i = n;
  if (i >= MAXS) return;
  depth[i] = backtrace(buf[i], DEPTH);
  n = i + 1;
}
__attribute__((constructor)) static void start(void) {
  void* warm[4];
  backtrace(warm, 4);
  signal(SIGPROF, on_prof);
  struct itimerval t = {{0, 500}, {0, 500}};
  setitimer(ITIMER_PROF, &t, NULL);
}
__attribute__((destructor)) static void stop(void) {
  struct itimerval t = {{0, 0}, {0, 0}};
  setitimer(ITIMER_PROF, &t, NULL);
  const char* out = getenv("PROF_OUT");
  if (!out) return;
  char path[4096];
  snprintf(path, sizeof path, "%s.%d", out, (int)getpid());
  FILE* f = fopen(path, "w");
  if (!f) return;
  FILE* m = fopen("/proc/self/maps", "r");
  char line[1024];
  while (m && fgets(line, sizeof line, m)) fprintf(f, "M %s", line);
  if (m) fclose(m);
  for (int i = 0; i < n; ++i) {
    fprintf(f, "S");
    for (int d = 0; d < depth[i]; ++d) fprintf(f, " %p", buf[i][d]);
    fprintf(f, "\n");
  }
  fclose(f);
}
