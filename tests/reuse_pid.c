/* reuse_pid TARGET PROG ARGS...: run PROG as PID TARGET, print the PID, wait for it.
 *
 * clone3() with set_tid picks the new process's PID in our PID namespace (root only;
 * Linux >= 5.5): a PID that a process just freed is reused at once and for certain,
 * with no cycling through the PID space. Fails (EEXIST) when TARGET is taken. */
#define _GNU_SOURCE
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: reuse_pid TARGET PROG ARGS...\n");
        return 2;
    }
    pid_t target = (pid_t)atoi(argv[1]);
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.exit_signal = SIGCHLD;
    args.set_tid = (uint64_t)(uintptr_t)&target;
    args.set_tid_size = 1;
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid < 0) {
        perror("reuse_pid: clone3");
        return 3;
    }
    if (pid == 0) {
        execv(argv[2], argv + 2);
        _exit(127);
    }
    printf("%ld\n", pid);
    fflush(stdout);
    int status;
    waitpid((pid_t)pid, &status, 0);
    return 0;
}
