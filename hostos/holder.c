/*
 * kata-vm-holder: the parent of one VMM, alive as long as someone holds its owner socket.
 *
 *   kata-vm-holder --owner-fd N [--pass-fd M ...] [--cpu-bound] -- VMM ARGV...
 *
 * Why (hostos/holder.py has the Python side): a VM the VM cache boots ahead must die with
 * the cache while no pod has it, and with the pod's shim once one has. The parent-death
 * signal ties a process to its parent, which never changes; so the VMM's parent is this
 * holder (the VMM gets SIGKILL as its parent-death signal), and the holder's life is tied
 * to a socket instead. Whoever holds the other end owns the VM; the end can be handed to
 * another process (SCM_RIGHTS). Once every copy is closed (its owner exited, also with
 * kill -9), the holder kills the VMM and exits. The holder has no parent-death signal of
 * its own: the cache may exit while a pod runs its VM.
 *
 * On the owner socket, one JSON line each: {"pid": P, "start_time": T} once the VMM runs
 * (T: field 22 of /proc/P/stat), then {"exited": S} when it exits (S: its exit code, or
 * minus the signal that ended it). It reads nothing but the EOF. SIGTERM, SIGINT or SIGHUP
 * make it kill the VMM (and exit once it is gone). A VMM that cannot be executed: a line
 * on stderr, exit status 1, no hello.
 *
 * C rather than Python: a holder lives as long as its VM, one per cached VM and per pod
 * that took one; a Python holder cost 10-14 MiB of PSS, this one well under 1 MiB.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define PROG "kata-vm-holder"
#define MAX_PASS_FDS 64

static volatile sig_atomic_t vmm_pid;  /* 0 once reaped: never signal a reused pid */

static void stop_vmm(int sig) {
    (void)sig;
    if (vmm_pid > 0)
        kill(vmm_pid, SIGKILL);
}

static int parse_fd(const char *s) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *s == '\0' || *end != '\0' || v < 0 || v > INT_MAX)
        return -1;
    return (int)v;
}

static void usage(const char *why) {
    fprintf(stderr, "%s: %s\nusage: %s --owner-fd N [--pass-fd M ...] [--cpu-bound] -- "
            "VMM ARGV...\n", PROG, why, PROG);
    exit(2);
}

/* Field 22 of /proc/<pid>/stat (the start time in clock ticks), 0 if unreadable. */
static unsigned long long start_time(pid_t pid) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = '\0';
    char *p = strrchr(buf, ')');  /* the command name may hold spaces and parentheses */
    if (!p)
        return 0;
    /* ") " then fields 3, 4, ...: each space passed starts the next field, up to 22 */
    for (int field = 3; field <= 22 && p; field++)
        p = strchr(p + 1, ' ');
    return p ? strtoull(p + 1, NULL, 10) : 0;
}

static void say(int owner, const char *line) {
    /* No owner left means nobody to tell: errors are ignored (MSG_NOSIGNAL: no SIGPIPE). */
    (void)!send(owner, line, strlen(line), MSG_NOSIGNAL);
}

/* In the child: only stdio and the passed fds survive the exec. */
static void close_others(const int *keep, int nkeep) {
    if (syscall(SYS_close_range, 3U, ~0U, 4U /* CLOSE_RANGE_CLOEXEC */) != 0) {
        for (int fd = 3; fd < 4096; fd++)
            fcntl(fd, F_SETFD, FD_CLOEXEC);
    }
    for (int i = 0; i < nkeep; i++)
        fcntl(keep[i], F_SETFD, 0);
}

/* Fork and exec the VMM; its exec's errno comes back through a close-on-exec pipe. */
static pid_t spawn(char **argv, const int *pass, int npass, int cpu_bound) {
    int report[2];
    if (pipe2(report, O_CLOEXEC) != 0)
        return -1;
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        int err = errno;
        close(report[0]);
        close(report[1]);
        errno = err;
        return -1;
    }
    if (pid == 0) {
        int err;
        close(report[0]);
        if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent)
            _exit(127);
        signal(SIGPIPE, SIG_DFL);
        int null = open("/dev/null", O_RDWR);
        if (null < 0 || dup2(null, 0) < 0 || dup2(null, 1) < 0)
            goto fail;
        if (null > 2)
            close(null);
        if (cpu_bound) {  /* a woken batch thread does not preempt the running one */
            struct sched_param param = {0};
            if (sched_setscheduler(0, SCHED_BATCH, &param) != 0)
                goto fail;
        }
        close_others(pass, npass);
        fcntl(report[1], F_SETFD, FD_CLOEXEC);
        execvp(argv[0], argv);
    fail:
        err = errno;
        (void)!write(report[1], &err, sizeof err);
        _exit(127);
    }
    close(report[1]);
    int err = 0;
    ssize_t n;
    do
        n = read(report[0], &err, sizeof err);
    while (n < 0 && errno == EINTR);
    close(report[0]);
    if (n > 0) {
        waitpid(pid, NULL, 0);
        errno = err;
        return -1;
    }
    return pid;
}

/* Until the VMM exits (its status goes to the owner) or the owner goes (it is killed). */
static int hold(int owner, pid_t pid) {
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0) {
        fprintf(stderr, "%s: pidfd_open: %s\n", PROG, strerror(errno));
        kill(pid, SIGKILL);
    }
    struct pollfd fds[2] = {{.fd = pidfd, .events = POLLIN}, {.fd = owner, .events = POLLIN}};
    int owner_gone = 0;
    while (pidfd >= 0 && !owner_gone) {
        if (poll(fds, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (fds[0].revents)
            break;
        if (fds[1].revents) {
            char buf[4096];
            ssize_t n = recv(owner, buf, sizeof buf, MSG_DONTWAIT);
            owner_gone = n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR);
        }
    }
    if (owner_gone)  /* every owner is gone */
        kill(pid, SIGKILL);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    vmm_pid = 0;
    if (!owner_gone) {
        char line[64];
        int code = WIFSIGNALED(status) ? -WTERMSIG(status) : WEXITSTATUS(status);
        snprintf(line, sizeof line, "{\"exited\": %d}\n", code);
        say(owner, line);
    }
    return 0;
}

int main(int argc, char **argv) {
    int owner = -1, npass = 0, cpu_bound = 0, i;
    int pass[MAX_PASS_FDS];
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) {
            i++;
            break;
        } else if (strcmp(argv[i], "--owner-fd") == 0 && i + 1 < argc) {
            if ((owner = parse_fd(argv[++i])) < 0)
                usage("--owner-fd takes a file descriptor number");
        } else if (strcmp(argv[i], "--pass-fd") == 0 && i + 1 < argc) {
            if (npass == MAX_PASS_FDS || (pass[npass++] = parse_fd(argv[++i])) < 0)
                usage("--pass-fd takes a file descriptor number (at most 64 of them)");
        } else if (strcmp(argv[i], "--cpu-bound") == 0) {
            cpu_bound = 1;
        } else {
            usage("unknown argument");
        }
    }
    if (owner < 0)
        usage("--owner-fd is required");
    if (i >= argc)
        usage("no VMM command given");
    if (fcntl(owner, F_SETFD, FD_CLOEXEC) != 0)  /* the VMM must not hold the VM alive */
        usage("--owner-fd is not an open file descriptor");
    /* What a parent may pass down through exec: an ignored SIGCHLD (children would be
     * reaped unseen, and their status lost) or blocked signals (the VMM would inherit them). */
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    signal(SIGCHLD, SIG_DFL);
    signal(SIGPIPE, SIG_IGN);
    pid_t pid = spawn(argv + i, pass, npass, cpu_bound);
    if (pid < 0) {
        fprintf(stderr, "%s: failed to start %s: %s\n", PROG, argv[i], strerror(errno));
        return 1;
    }
    vmm_pid = pid;
    for (int k = 0; k < npass; k++)  /* the VMM has them */
        close(pass[k]);
    struct sigaction sa = {.sa_handler = stop_vmm};
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    char hello[96];
    snprintf(hello, sizeof hello, "{\"pid\": %d, \"start_time\": %llu}\n", (int)pid,
             start_time(pid));
    say(owner, hello);
    return hold(owner, pid);
}
