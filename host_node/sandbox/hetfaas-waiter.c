/* hetfaas-waiter: the last step of a sandbox start, in C so that it is quick.
 *
 * A shard spawner clones a sandbox, and its Python child builds the sandbox (namespaces, cgroups,
 * root view) and then execs this program inside it, as root in the sandbox's namespaces. We wait
 * on the status socket (fd given as argv[1]) for one activation datagram, then mount the
 * function's code, renumber its fds, drop every privilege, install seccomp and execve it.
 *
 * Activation datagram (native byte order), with SCM_RIGHTS fds [code_tree, deps_tree, fd0, ...]:
 *   u32 flags, u32 uid, u32 gid, u32 nofile, u32 seccomp_len (bytes), seccomp program,
 *   argv strings (NUL-terminated), an empty string, env strings (NUL-terminated), an empty string.
 * With flag CODE_MOUNTED (user namespaces: the spawner mounted /code from outside; a stem cell:
 * no code yet) there is no code_tree; deps_tree (for /deps) is there only with flag DEPS_TREE.
 * Replies on the socket: "R<monotonic seconds>" just before execve, "E<message>" on failure.
 * The socket is close-on-exec: end-of-file after R means execve succeeded. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_MESSAGE 65536
#define MAX_FDS 16
#define MAX_STRINGS 512
#define STAGE_FD 100
#define MOVE_MOUNT_F_EMPTY_PATH 0x4
#define CODE_MOUNTED 1
#define DEPS_TREE 2

static int status_fd;

static void fail(const char *what) {
    char message[512];
    int length = snprintf(message, sizeof message, "E%s: %s", what, strerror(errno));
    send(status_fd, message, (size_t)length, 0);
    _exit(127);
}

static size_t receive(char *buffer, int *fds, int *nfds) {
    char control[CMSG_SPACE(MAX_FDS * sizeof(int))];
    struct iovec iov = {buffer, MAX_MESSAGE};
    struct msghdr header = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    ssize_t size = recvmsg(status_fd, &header, MSG_CMSG_CLOEXEC);
    if (size <= 0) _exit(0); /* the spawner retired this sandbox */
    *nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&header); c; c = CMSG_NXTHDR(&header, c)) {
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            *nfds = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            memcpy(fds, CMSG_DATA(c), (size_t)*nfds * sizeof(int));
        }
    }
    return (size_t)size;
}

/* Split NUL-terminated strings up to an empty one; returns the offset after it. */
static size_t strings(char *buffer, size_t at, size_t size, char **out) {
    int count = 0;
    while (at < size && buffer[at] != '\0' && count < MAX_STRINGS - 1) {
        out[count++] = buffer + at;
        at += strlen(buffer + at) + 1;
    }
    out[count] = NULL;
    return at + 1;
}

static void renumber(int *fds, int nfds) {
    /* Stage above every target first, so no dup2 clobbers a source not yet moved. */
    int status = fcntl(status_fd, F_DUPFD_CLOEXEC, STAGE_FD + MAX_FDS);
    if (status < 0) fail("dup status");
    status_fd = status;
    for (int i = 0; i < nfds; i++)
        if ((fds[i] = fcntl(fds[i], F_DUPFD_CLOEXEC, STAGE_FD)) < 0) fail("dup fd");
    for (int i = 0; i < nfds; i++)
        if (dup2(fds[i], i) < 0) fail("dup2");
    if (syscall(SYS_close_range, nfds, status_fd - 1, 0) < 0) fail("close_range");
    if (syscall(SYS_close_range, status_fd + 1, ~0U, 0) < 0) fail("close_range");
}

static void drop_privileges(uint32_t uid, uint32_t gid, uint32_t nofile) {
    struct rlimit core = {0, 0}, files = {nofile, nofile};
    if (setrlimit(RLIMIT_CORE, &core) || setrlimit(RLIMIT_NOFILE, &files)) fail("setrlimit");
    for (int cap = 0; cap <= 63; cap++)
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) && errno != EINVAL) fail("drop capability");
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)) fail("clear ambient capabilities");
    if (setgroups(0, NULL) || setresgid(gid, gid, gid) || setresuid(uid, uid, uid)) fail("setuid");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) fail("no_new_privs");
}

int main(int argc, char **argv) {
    static char buffer[MAX_MESSAGE + 1];
    static char *function_argv[MAX_STRINGS], *function_env[MAX_STRINGS];
    int fds[MAX_FDS], nfds;
    uint32_t head[5];
    if (argc != 2) return 2;
    status_fd = atoi(argv[1]);
    size_t size = receive(buffer, fds, &nfds);
    buffer[size] = '\0';
    if (size < sizeof head) { errno = EINVAL; fail("activation message"); }
    memcpy(head, buffer, sizeof head);
    int code_mounted = head[0] & CODE_MOUNTED, deps_tree = (head[0] & DEPS_TREE) != 0;
    if (nfds < (code_mounted ? 0 : 1) + deps_tree) { errno = EINVAL; fail("activation fds"); }
    size_t at = sizeof head;
    struct sock_fprog filter = {(unsigned short)(head[4] / 8), (struct sock_filter *)(buffer + at)};
    at += head[4];
    at = strings(buffer, at, size, function_argv);
    strings(buffer, at, size, function_env);
    if (!function_argv[0]) { errno = EINVAL; fail("empty command"); }

    int *function_fds = fds;
    if (!code_mounted) {
        if (syscall(SYS_move_mount, fds[0], "", AT_FDCWD, "/code", MOVE_MOUNT_F_EMPTY_PATH)) fail("mount the code");
        close(fds[0]);
        function_fds++, nfds--;
    }
    if (deps_tree) {
        if (syscall(SYS_move_mount, function_fds[0], "", AT_FDCWD, "/deps", MOVE_MOUNT_F_EMPTY_PATH)) fail("mount the dependencies");
        close(function_fds[0]);
        function_fds++, nfds--;
    }
    if (chdir("/code")) fail("chdir /code");
    renumber(function_fds, nfds);
    drop_privileges(head[1], head[2], head[3]);
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &filter)) fail("seccomp");

    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    char ready[64];
    int length = snprintf(ready, sizeof ready, "R%ld.%09ld", (long)now.tv_sec, now.tv_nsec);
    send(status_fd, ready, (size_t)length, 0);
    environ = function_env;
    execvp(function_argv[0], function_argv);
    char what[300];
    snprintf(what, sizeof what, "cannot start '%.250s'", function_argv[0]);
    fail(what);
}
